"""Training: CANet (router + supernet, the paper's objective) or one fixed sub-network.

:func:`train` writes into its run directory::

    RUN_DIR/config.yaml     the resolved config
    RUN_DIR/best/           checkpoint with the best validation NDCG@10 (a routed run: with
                            calibration.json, the serve-time budgets of ``calibration_budgets``
                            calibrated on the validation users when training ends)
    RUN_DIR/last/           checkpoint after the last finished epoch (for resume)

(``canet train``, in :mod:`canet.cli.train`, adds ``RUN_DIR/metrics.json``: the test metrics
of best/.)

A CANet step (per batch of training windows ``seqs, targets [B, L]``)::

    router_logits = router(seqs)                              # [B, C]
    choice = gumbel_straight_through(router_logits, tau)      # [B, C] one-hot forward
    loss = CE(logits_masked(seqs, choice), targets)
         + w.guide * guide_loss(router_logits, smallest_hits(...), space, w)
         + w.uniform * uniform_loss(router_logits)
         + w.balance * balance_loss(router_logits)           # 0 by default (not the paper's)
         + flops_weight * flops_loss(router_logits, fractions, flops_target)[0]
           # only with flops_target (not the paper's): (E_b[sum_c p_bc f_c] - flops_target)^2,
           # f_c = config c's FLOPs over the largest's (canet.budget.flops_fractions)

With ``fixed_config`` the step is plain CE through ``logits_sliced(seqs, config)``.

Under torchrun (``train(group=...)``, :mod:`canet.distributed`) each rank computes its share of
each global batch's loss (:class:`StepShard`) inside DistributedDataParallel; the results are
those of one process on the same global batches, except the dropout masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .budget import BudgetTable
from .calibrate import calibrate, format_point, resolve_budgets
from .checks import check_sequences
from .config import (
    ARCHITECTURE_KEYS,
    TrainConfig,
    dump_config,
)
from .data import SequenceData
from .distributed import Group
from .errors import CanetError, CheckpointError
from .evaluate import evaluate, format_histogram
from .losses import (
    balance_loss,
    flops_fraction_table,
    flops_loss,
    guide_loss,
    linear_cross_entropy,
    next_item_loss,
    smallest_hits,
    uniform_loss,
)
from .model import CANet, gumbel_straight_through

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "build_model",
    "step_loss",
    "time_training",
    "train",
]

Log = Callable[[str], None]
_T = TypeVar("_T")


class TrainingDivergedError(CanetError):
    """More NaN/inf losses or gradients than ``max_bad_steps`` allows."""


@dataclass
class TrainResult:
    """What a training run did; the checkpoints are under ``run_dir``."""

    run_dir: Path
    best_score: float | None
    best_epoch: int | None
    epochs_done: int
    stopped_early: bool
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    calibration: BudgetTable | None = None  # written into best/ (None: not calibrated)

    @property
    def train_seconds(self) -> float:
        """Seconds spent in training epochs (validation excluded), over the whole history."""
        return sum(record.get("train_seconds", 0.0) for record in self.history)

    @property
    def targets_per_second(self) -> float:
        """Real targets trained on per second of training epochs, over the whole history."""
        seconds = self.train_seconds
        targets = sum(record.get("targets", 0) for record in self.history)
        return targets / seconds if seconds > 0 else math.nan


def build_model(config: TrainConfig, num_items: int) -> CANet:
    """A freshly initialised CANet for ``num_items`` items (uses the global torch RNG)."""
    return CANet(
        num_items,
        config.max_len,
        config.routing_space(),
        dropout=config.dropout,
        router_dim=config.router_dim,
        router_heads=config.router_heads,
        residual_scaling=config.residual_scaling,
    )


def step_loss(
    model: CANet,
    seqs: Tensor,
    targets: Tensor,
    config: TrainConfig,
    tau: float,
    noise: torch.Generator | None,
    fixed_config_id: int | None = None,
    *,
    target_positions: Tensor | None = None,
    all_positions: bool = False,
    shard: StepShard | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Loss of one training batch. seqs, targets ``[B, L']`` int64 (0 = padding / no target);
    ``L' <= max_len``: a batch trimmed to its longest window keeps the window's last ``L'``
    columns, and every sample's math is that of its full window.

    The output layer and the cross-entropy run only at the ``T`` positions with a target:
    ``target_positions [T]`` are their flat indices into ``[B * L']`` (``targets != 0``), given by
    a caller that computed them on the host so that a GPU step never syncs (None: computed
    here). ``all_positions`` is the computation before issue 13, kept as the reference of tests
    and benchmarks: logits ``[B, L', N+1]`` at every position, padding ignored by the loss.
    Both give the same loss (the mean over targeted positions) up to float rounding.

    ``shard``: this rank's part of a distributed step (see :class:`StepShard`); the loss and
    every logged part are then this rank's SHARE of the global batch's, so that they add up
    over the ranks to what one process computes on the global batch, and so do the gradients.

    Returns (scalar loss, {part: detached 0-d tensor} for logging, sampled config ids ``[B]``
    or None). Nothing here reads a value back to the host.
    """
    if fixed_config_id is not None:
        hidden = model.supernet.hidden_sliced(seqs, model.space.configs[fixed_config_id])
        loss = _next_item(model, hidden, targets, target_positions, all_positions)
        if shard is not None:
            loss = loss * shard.target_scale
        return loss, {"next_item": loss.detach()}, None
    weights = config.loss_weights()
    if config.validate_router_input:
        check_sequences(seqs, model.num_items, seqs.shape[1])
    # The router's distribution, the Gumbel sample and the auxiliary losses stay in fp32
    # under bf16 autocast (they are [B, C] small; their statistics are what the router learns).
    router_logits = model.router.logits_unchecked(seqs).float()
    with torch.autocast(seqs.device.type, enabled=False):
        choice = gumbel_straight_through(
            router_logits, tau, noise, None if shard is None else shard.exponential
        )
    hidden = model.supernet.hidden_masked(seqs, choice)
    ce = _next_item(model, hidden, targets, target_positions, all_positions)
    # Windows end at a real item, so the last target is always real (the guide needs it).
    hits = smallest_hits(model, seqs, targets[:, -1], k=weights.guide_k)
    with torch.autocast(seqs.device.type, enabled=False):
        guide = guide_loss(router_logits, hits, model.space, weights)
        uniform = uniform_loss(router_logits)
        if shard is not None:  # means over this rank's targets / windows -> shares of the global
            ce = ce * shard.target_scale
            guide, uniform = guide * shard.sample_scale, uniform * shard.sample_scale
        loss = ce + weights.guide * guide + weights.uniform * uniform
        parts = {"next_item": ce.detach(), "guide": guide.detach(), "uniform": uniform.detach()}
        batch_mean = None if shard is None else shard.batch_mean()
        if weights.balance:
            balance = _share(balance_loss(router_logits, batch_mean), shard)
            loss = loss + weights.balance * balance
            parts["balance"] = balance.detach()
        if config.flops_target is not None:
            fractions = flops_fraction_table(
                model.space, model.max_len, model.num_items, torch.float32, seqs.device
            )
            penalty, expected = flops_loss(
                router_logits, fractions, config.flops_target, batch_mean
            )
            penalty, expected = _share(penalty, shard), _share(expected, shard)
            loss = loss + config.flops_weight * penalty
            # "expected_flops" is logged, not optimised: the epoch's "loss" stays the sum above.
            parts["flops"] = penalty.detach()
            parts["expected_flops"] = expected.detach()
    return loss, parts, choice.detach().argmax(dim=-1)


@dataclass(frozen=True)
class StepShard:
    """This rank's part of the global batch of a distributed step (:mod:`canet.distributed`).

    ``target_scale`` = (this share's targeted positions) / (the global batch's), and
    ``sample_scale`` = (this share's windows) / (the global batch's): a mean over the share
    times its scale is the share's part of the mean over the global batch. A rank whose share
    of a batch is empty (a batch of fewer windows than ranks) runs the batch's first window with
    both scales 0 (``weight`` 0): DDP needs the same forward and backward on every rank, and the
    window adds nothing. ``exponential [b, C]``: the share's rows of the standard exponential
    draws of the whole global batch (the Gumbel noise), so a window's noise is the same whatever
    rank computes it."""

    group: Group
    samples: int  # windows in the global batch
    rows: slice  # this share's rows of the global batch
    target_scale: float
    sample_scale: float
    weight: float  # 1.0, or 0.0 for a rank with an empty share
    exponential: Tensor | None = None  # set by the training loop, on the device

    def batch_mean(self) -> Callable[[Tensor], Tensor]:
        """The global batch's mean of per-window rows (for the batch-level loss terms)."""
        return distributed.batch_mean(self.samples, self.weight)


def _share(term: Tensor, shard: StepShard | None) -> Tensor:
    """A batch-level term (the same on every rank) as this rank's share of it."""
    return term if shard is None else distributed.replicated_share(term, shard.group.world_size)


def _next_item(
    model: CANet,
    hidden: Tensor,
    targets: Tensor,
    positions: Tensor | None,
    all_positions: bool,
) -> Tensor:
    """Next-item cross-entropy of hidden states ``[B, L', h]`` against ``targets [B, L']``."""
    if all_positions:
        return next_item_loss(model.supernet.logits(hidden), targets)
    flat_targets = targets.flatten()
    if positions is None:
        positions = flat_targets.nonzero().squeeze(1)
    rows = hidden.flatten(0, 1).index_select(0, positions)  # [T, h]
    out = model.supernet.out
    return linear_cross_entropy(rows, out.weight, out.bias, flat_targets.index_select(0, positions))


# Steps between progress-bar loss updates (each reads the running loss back from the device).
PROGRESS_EVERY = 50


class _DeviceSums:
    """An epoch's logged sums, kept on the training device so a step never waits for it."""

    def __init__(self, device: torch.device, n_configs: int) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.parts: dict[str, Tensor] = {}
        self.sampled = torch.zeros(n_configs, dtype=torch.int64, device=device)

    def add(self, loss: Tensor, norm: Tensor, parts: dict[str, Tensor], chosen: Tensor | None):
        self.loss += loss.detach()
        self.grad_norm += norm
        for name, value in parts.items():
            if name not in self.parts:
                self.parts[name] = torch.zeros_like(self.loss)
            self.parts[name] += value
        if chosen is not None:  # index_add_, not bincount: CUDA's bincount reads min/max back
            self.sampled.index_add_(0, chosen, torch.ones_like(chosen))

    def mean_loss(self, steps: int) -> float:
        return float(self.loss) / steps

    def means(self, steps: int) -> dict[str, float]:
        """{"loss", "grad_norm", part...}: means over the epoch's steps (NaN without a step)."""
        names = ["loss", "grad_norm", *self.parts]
        values = torch.stack([self.loss, self.grad_norm, *self.parts.values()]).tolist()
        return {n: v / steps if steps else math.nan for n, v in zip(names, values, strict=True)}

    def histogram(self) -> list[int]:
        return self.sampled.tolist()

    def reduce(self, group: Group) -> None:
        """Sum the ranks' shares of the loss, its parts and the sampled histogram (the
        gradient norm is already the same on every rank: it is not summed)."""
        shares = torch.stack([self.loss, *self.parts.values()])
        group.all_reduce_sum(shares)
        self.loss = shares[0]
        self.parts = dict(zip(self.parts, shares[1:], strict=True))
        group.all_reduce_sum(self.sampled)


class _Objective(torch.nn.Module):
    """:func:`step_loss` as a module's forward (for DistributedDataParallel to wrap)."""

    def __init__(self, model: CANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        return step_loss(self.model, *args, **kwargs)


class _Run:
    """The mutable state of one training run (so resume can restore every piece of it)."""

    def __init__(
        self, config: TrainConfig, data: SequenceData, run_dir: Path, log: Log,
        group: Group | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.run_dir = run_dir
        self.log = log
        self.group = group
        space = config.routing_space()
        self.fixed_id = config.fixed_config_id(space)
        self.device = config.torch_device() if group is None else group.device
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        torch.manual_seed(config.seed)
        self.generators = {
            "data": torch.Generator().manual_seed(config.seed),
            "noise": torch.Generator(device=self.device).manual_seed(config.seed + 1),
        }
        self.model = build_model(config, data.num_items).to(self.device)
        self.step = _Objective(self.model)
        if group is not None:
            # DDP reduces the gradients of work done inside the forward of the module it wraps,
            # so the whole loss is that module's forward. find_unused_parameters: a fixed-config
            # step uses a slice of the supernet (the blocks past its depth get no gradient); a
            # routed step runs every block under the masks, so each parameter gets a gradient
            # (tested) and the per-step search of the graph for unused ones is skipped. Never
            # static_graph: the used set differs between routed and fixed runs.
            self.step = torch.nn.parallel.DistributedDataParallel(
                self.step,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.fixed_id is not None,
            )
        # The fused Adam (one kernel over all parameters) is about 4x faster than the foreach
        # one on CPU (measured: 7 vs 28 ms a step for the 7.6M-parameter model).
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer,
            step_size=max(1, config.lr_step_size),
            gamma=config.lr_gamma if config.lr_step_size > 0 else 1.0,
        )
        self.epoch = 0  # finished epochs
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.validations_without_gain = 0
        self.skipped_steps = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.data_identity = ckpt.data_identity(data)  # once: it hashes the whole split

    # -- persistence ---------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        rng_json, _ = ckpt.capture_rng_state(self.generators)
        return {
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "validations_without_gain": self.validations_without_gain,
            "skipped_steps": self.skipped_steps,
            "stopped_early": self.stopped_early,
            "history": self.history,
            # How the run ran (last): the processes of a distributed run and their backend.
            "world_size": 1 if self.group is None else self.group.world_size,
            "backend": None if self.group is None else self.group.backend,
            "rng": rng_json,
            "data": self.data_identity,
        }

    def optimizer_state(self) -> dict[str, Any]:
        _, rng_tensors = ckpt.capture_rng_state(self.generators)
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_tensors,
        }

    def save(self, name: str) -> None:
        if self.group is not None and not self.group.is_main:
            return  # rank 0 writes the run directory; every rank holds the same state
        ckpt.save_checkpoint(
            self.run_dir / name, self.model, self.config, self.data.vocab,
            self.trainer_state(), self.optimizer_state(),
        )

    def restore(self, directory: Path) -> None:
        """Weights, optimizer, scheduler, counters and every RNG from ``directory``."""
        ckpt.load_model_weights(directory, self.model)
        state, tensors = ckpt.load_training_state(directory)
        try:
            self.optimizer.load_state_dict(tensors["optimizer"])
            self.scheduler.load_state_dict(tensors["scheduler"])
            ckpt.restore_rng_state(state["rng"], tensors["rng"], self.generators)
            self.epoch = int(state["epoch"])
            self.best_score = state["best_score"]
            self.best_epoch = state["best_epoch"]
            self.validations_without_gain = int(state["validations_without_gain"])
            self.skipped_steps = int(state["skipped_steps"])
            self.stopped_early = bool(state["stopped_early"])
            self.history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"{directory}: training state does not fit this run ({error!r})"
            ) from None

    # -- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, max_steps: int | None = None, reference: bool = False) -> dict[str, Any]:
        """One pass over the training windows (or its first ``max_steps`` batches: the batch
        order is random, so they are a fair sample). A step reads one value back to the host
        (the fused finiteness check of its loss and total gradient norm); the logged sums stay
        on the device until the epoch ends (and every PROGRESS_EVERY steps for the progress
        bar). ``reference``: the step as it was before issue 13, for benchmarks only (full
        ``max_len`` batches in the plain shuffled order, logits at every position, every
        gradient and logged value read back each step)."""
        config, model, group = self.config, self.model, self.group
        model.train()
        tau = config.tau(self.epoch)
        if group is not None:
            # Each rank draws its own dropout masks (the one thing that depends on the world
            # size), from a stream fixed by (seed, epoch, rank): a resumed run draws the same.
            entropy = [config.seed % 2**64, self.epoch, group.rank]  # seeds may be negative
            seed = np.random.SeedSequence(entropy).generate_state(2)
            torch.manual_seed(int(seed[0]) << 32 | int(seed[1]))
        total = self.data.num_train_batches(config.batch_size)
        batches = self._batches(reference)
        if max_steps is not None:
            batches = itertools.islice(batches, max_steps)
            total = min(total, max_steps)
        device = self.device
        sums = _DeviceSums(device, model.space.n_configs)
        steps, skipped, targets_seen = 0, 0, 0
        parameters = [p for p in model.parameters() if p.requires_grad]
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"
        )
        # DDP averages the ranks' gradients; each rank's loss is its share of the global loss,
        # so the gradient of the global loss is the average times the world size.
        world = 1 if group is None else group.world_size
        started = time.perf_counter()
        show = config.progress and (group is None or group.is_main)  # rank 0's bar only
        bar = tqdm(
            batches, total=total, desc=f"epoch {self.epoch + 1}/{config.epochs}",
            disable=not show, leave=False, dynamic_ncols=True,
        )
        for seqs, targets, shard, batch_targets in bar:
            # Flat indices of the targeted positions, found on the host: no device sync.
            positions = targets.flatten().nonzero().squeeze(1)
            seqs, targets, positions = (
                t.to(device, non_blocking=True) for t in (seqs, targets, positions)
            )
            if shard is not None and self.fixed_id is None:
                shard = self._draw_noise(shard)  # the global batch's Gumbel draws, on every rank
            with autocast:
                loss, parts, chosen = self.step(
                    seqs, targets, config, tau, self.generators["noise"], self.fixed_id,
                    target_positions=positions, all_positions=reference, shard=shard,
                )
            self.optimizer.zero_grad(set_to_none=True)
            (loss if world == 1 else loss * world).backward()
            grads = [p.grad for p in parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if config.clip_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(parameters, config.clip_grad_norm, norm)
            if reference:  # the old loop's host reads: each gradient and each logged value
                _ = [bool(torch.isfinite(g).all()) for g in grads]
                _ = [float(value) for value in parts.values()]
            bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
            if group is not None:
                # Every rank must take the same decision, or the replicas drift apart. (The
                # gradients, and so the norm, are already equal on every rank after DDP.)
                bad = group.any(bad)
            if bool(bad):  # the one sync
                # Skip rather than step: one bad batch must not poison Adam's moments.
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                self.skipped_steps += 1
                if self.skipped_steps > config.max_bad_steps:
                    raise _replicated(self.group, TrainingDivergedError(
                        f"training stopped: {self.skipped_steps} steps had a NaN/inf loss or "
                        f"gradient (max_bad_steps={config.max_bad_steps}); try a lower lr "
                        f"(now {config.lr}) or check the data"
                    ))
                continue
            self.optimizer.step()
            steps += 1
            targets_seen += batch_targets
            sums.add(loss, norm, parts, chosen if shard is None or shard.weight else None)
            if show and steps % PROGRESS_EVERY == 0:
                # (Distributed: rank 0's share times the world size, an estimate.)
                bar.set_postfix(loss=f"{world * sums.mean_loss(steps):.4f}", refresh=False)
        bar.close()
        if group is not None:
            sums.reduce(group)  # the epoch's shares, summed over the ranks
        if steps == 0 and (max_steps is None or max_steps > 0):
            # An epoch without an optimizer step would let the run "succeed" and save an
            # untrained model as best/ (every batch skipped under max_bad_steps, or no windows).
            if skipped:
                raise _replicated(self.group, TrainingDivergedError(
                    f"training stopped: epoch {self.epoch + 1} took no optimizer step (all "
                    f"{skipped} batches had a NaN/inf loss or gradient); check the loss weights, "
                    f"temperatures and lr (now {config.lr}) or the data"
                ))
            raise _replicated(self.group, TrainingDivergedError(
                f"training stopped: epoch {self.epoch + 1} took no optimizer step: the data "
                f"has no training windows ({self.data.path}: every user has fewer than 4 "
                "interactions)"
            ))
        means = sums.means(steps)  # reads the epoch's sums back (waits for the device)
        histogram = sums.histogram() if self.fixed_id is None else None
        seconds = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {
            "epoch": self.epoch + 1,
            "world_size": world,
            **means,
            "tau": tau,
            "lr": lr,
            "steps": steps,
            "skipped_steps": skipped,
            "train_seconds": seconds,
            "targets": targets_seen,
            "steps_per_second": steps / seconds if seconds > 0 else math.nan,
            "targets_per_second": targets_seen / seconds if seconds > 0 else math.nan,
            "sampled_histogram": histogram,
            "sampled_flops_fraction": self._sampled_fraction(histogram),
        }

    def _batches(self, reference: bool) -> Iterator[tuple[Tensor, Tensor, StepShard | None, int]]:
        """The epoch's steps: ``(seqs, targets, shard, targets in the global batch)``; one
        process takes each whole batch (shard None), a rank of a distributed run its
        contiguous share (:func:`canet.distributed.share`) of the same global batch."""
        config, data = self.config, self.data
        indices = data.train_batch_indices(
            config.batch_size, self.generators["data"],
            length_buckets=config.length_buckets and not reference,
        )
        group = self.group
        for chosen in indices:
            batch_targets = int(data.sample_lengths[chosen].sum())
            if group is None:
                yield (*data.train_windows(chosen, trim=not reference), None, batch_targets)
                continue
            rows = distributed.share(len(chosen), group.rank, group.world_size)
            mine, weight = chosen[rows], 1.0
            if not len(mine):  # fewer windows than ranks: a stand-in window that adds nothing
                rows, mine, weight = slice(0, 1), chosen[:1], 0.0
            shard = StepShard(
                group, len(chosen), rows,
                target_scale=weight * int(data.sample_lengths[mine].sum()) / batch_targets,
                sample_scale=weight * len(mine) / len(chosen),
                weight=weight,
            )
            yield (*data.train_windows(mine, trim=not reference), shard, batch_targets)

    def _draw_noise(self, shard: StepShard) -> StepShard:
        """``shard`` with its rows of the global batch's standard exponential draws ``[B, C]``
        (what one process draws for the whole batch in ``gumbel_straight_through``)."""
        draws = torch.empty(
            (shard.samples, self.model.space.n_configs), dtype=torch.float32, device=self.device
        ).exponential_(generator=self.generators["noise"])
        return dataclasses.replace(shard, exponential=draws[shard.rows])

    def _sampled_fraction(self, histogram: list[int] | None) -> float | None:
        """Mean FLOPs fraction of the configs the Gumbel samples picked (None: fixed config;
        NaN: no step)."""
        if histogram is None:
            return None
        total = sum(histogram)
        if not total:
            return math.nan
        fractions = self.model.flops_fractions
        return sum(n * f for n, f in zip(histogram, fractions, strict=True)) / total

    def validate(self) -> dict[str, Any]:
        return evaluate(
            self.model, self.data, "valid", ks=self.config.ks,
            exclude_history=self.config.exclude_history,
            batch_size=self.config.eval_batch_size, fixed_config_id=self.fixed_id,
            group=self.group,
        )


def time_training(
    config: TrainConfig,
    data: SequenceData,
    *,
    steps: int | None = None,
    reference_step: bool = False,
    group: Group | None = None,
) -> dict[str, Any]:
    """Train a fresh model for one epoch (or its first ``steps`` batches) exactly as
    :func:`train` does, without validation or checkpoints, and return the epoch's record
    (``train_seconds``, ``steps``, ``targets``, ``steps_per_second``, ``targets_per_second``,
    losses). ``reference_step``: the pre-issue-13 step (see ``_Run.train_epoch``), so that a
    benchmark measures old and new side by side. ``group``: as one rank of a distributed run
    (every rank calls this alike; the losses are the global batch's, summed over the ranks).
    For benchmarks (``canet bench --train``)."""
    return _with_threads(config, lambda: _Run(
        config, data, Path(os.devnull), lambda _: None, group,
    ).train_epoch(max_steps=steps, reference=reference_step))


def _check_resumable(saved: TrainConfig, requested: TrainConfig, directory: Path) -> None:
    changed = [
        f"{key}: {getattr(saved, key)!r} -> {getattr(requested, key)!r}"
        for key in ARCHITECTURE_KEYS
        if getattr(saved, key) != getattr(requested, key)
    ]
    if changed:
        raise CheckpointError(
            f"{directory}: cannot resume with a changed architecture or data setup ("
            + "; ".join(changed) + "); start a new run directory instead"
        )


def _set_aside_previous_run(run_dir: Path) -> str:
    """Move the run in ``run_dir`` to ``run_dir/replaced/`` (one generation is kept).

    A new run must never sit beside another run's best/ (evaluate and recommend would serve
    the old model if the new one fails before its first validation), and a failed new run
    must not lose the old one either.
    """
    replaced = run_dir / "replaced"
    if replaced.exists():
        shutil.rmtree(replaced)
    replaced.mkdir()
    moved = []
    for path in sorted(run_dir.iterdir()):
        if path.name in ("best", "last", "config.yaml") or path.name.startswith("metrics"):
            os.replace(path, replaced / path.name)
            moved.append(path.name)
    return f"--overwrite: moved the previous run ({', '.join(moved)}) to {replaced}"


def train(
    config: TrainConfig,
    data: SequenceData,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = print,
    group: Group | None = None,
) -> TrainResult:
    """Train (or resume) a run into ``run_dir``; see the module docstring for the layout.

    ``group``: train as one rank of a distributed run (:mod:`canet.distributed`; every rank
    calls this with the same arguments). Rank 0 alone holds the run directory's lock, writes
    into it and logs; the others never touch it. Every rank returns the same result.

    Raises CheckpointError when ``run_dir`` already holds a run and neither ``resume`` nor
    ``overwrite`` is set, or when resuming would change the architecture or the data;
    TrainingDivergedError after more than ``config.max_bad_steps`` non-finite steps;
    CheckpointError "RUN_DIR is in use by pid N" while another process trains into ``run_dir``.
    In a distributed run, a rank that stops for an error another rank reports raises
    :class:`canet.distributed.ReportedElsewhere`.
    """
    main = group is None or group.is_main
    if group is None:
        config.torch_device()  # an unavailable device fails here, before run_dir is created
    else:
        log = log if main else _quiet
    with contextlib.ExitStack() as held:

        def lock() -> Path:
            # One writer per run directory, for the whole run: a second train() into it is
            # refused here, before anything in it is touched (see checkpoint.lock_run_dir).
            return held.enter_context(ckpt.lock_run_dir(run_dir)) if main else Path(run_dir)

        locked = distributed.agreed(group, lock)
        return _train_locked(config, data, locked, resume, overwrite, log, group)


def _replicated(group: Group | None, error: CanetError) -> CanetError:
    """``error`` as a rank of a distributed run raises it when every rank raises it alike (a
    decision they share, such as the all-reduced skip decision): rank 0 reports it, the others
    stop with :class:`canet.distributed.ReportedElsewhere`, so it is shown once."""
    if group is None or group.is_main:
        return error
    return distributed.ReportedElsewhere(f"rank 0 reports: {error}")


def _quiet(_: str) -> None:
    """The log of a rank other than 0 (rank 0 prints the run's log)."""


def _with_threads(config: TrainConfig, work: Callable[[], _T]) -> _T:
    """``work()`` at ``config.threads`` torch threads (0: the current setting)."""
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return work()
    finally:
        torch.set_num_threads(threads_before)  # the setting is process-wide: give it back


def _train_locked(
    config: TrainConfig, data: SequenceData, run_dir: Path, resume: bool, overwrite: bool,
    log: Log, group: Group | None,
) -> TrainResult:
    def prepare() -> None:
        for action in ckpt.cleanup_leftovers(run_dir):
            log(f"canet: {action}")
        has_run = any((run_dir / name).exists() for name in ("best", "last"))
        if has_run and not (resume or overwrite):
            raise CheckpointError(
                f"{run_dir}: already holds a training run (best/ or last/); pass --resume to "
                "continue it or --overwrite to start a new one there"
            )
        if resume and not (run_dir / "last").exists():
            raise CheckpointError(f"{run_dir / 'last'}: no checkpoint to resume from")
        if has_run and overwrite and not resume:
            log(f"canet: {_set_aside_previous_run(run_dir)}")

    distributed.agreed(group, prepare if group is None or group.is_main else lambda: None)
    return _with_threads(config, lambda: _train(config, data, run_dir, resume, log, group))


def _check_resume(run: _Run, config: TrainConfig, data: SequenceData, last: Path) -> None:
    saved = ckpt.load_checkpoint(last, model=None)
    _check_resumable(saved.config, config, last)
    if saved.vocab != data.vocab:
        raise CheckpointError(
            f"{last}: the data's users/items differ from the checkpoint's vocab.json; "
            "resume with the same data file and filters"
        )
    changed = ckpt.describe_data_change(saved.trainer_state.get("data"), data)
    if changed:  # resuming on another split could train on the old split's test targets
        raise CheckpointError(
            f"{last}: cannot resume with different data: {changed}; resume with the same "
            "data file and filters"
        )
    if saved.model.arch != run.model.arch:
        change = ckpt.describe_arch_change(saved.model.arch, run.model.arch)
        raise CheckpointError(f"{last}: {change}")
    run.restore(last)


def _train(
    config: TrainConfig, data: SequenceData, run_dir: Path, resume: bool, log: Log,
    group: Group | None,
) -> TrainResult:
    main = group is None or group.is_main
    run = _Run(config, data, run_dir, log, group)
    if resume:
        last = run_dir / "last"
        distributed.agreed(group, lambda: _check_resume(run, config, data, last))
        log(f"resumed {last} after epoch {run.epoch} (best ndcg@10 {run.best_score})")
    if main:
        ckpt.write_text_atomic(dump_config(config), run_dir / "config.yaml")

    space = run.model.space
    if run.fixed_id is None:
        mode = "CANet (routed)"
    else:
        mode = f"fixed config {run.fixed_id} {space.configs[run.fixed_id]}"
    if run.fixed_id is None and config.calibration_budgets:
        # Budgets below this model's cheapest config fail now, not after the training.
        try:
            resolve_budgets(config.calibration_budgets, min(run.model.flops_fractions))
        except CanetError as error:
            raise _replicated(group, error) from None
    params = sum(p.numel() for p in run.model.parameters())
    processes = "" if group is None else (
        f" on {group.world_size} processes ({group.backend}, global batch {config.batch_size})"
    )
    log(
        f"training {mode}{processes}: {data.num_users} users, {data.num_items} items, "
        f"{len(data.sample_users)} training windows, max_len {config.max_len}, "
        f"{space.n_configs} configs, {params:,} parameters"
    )
    while run.epoch < config.epochs and not run.stopped_early:
        record = run.train_epoch()
        run.epoch += 1
        is_last = run.epoch == config.epochs
        validation = None
        if run.epoch % config.eval_every == 0 or is_last:
            validation = run.validate()
            score = validation["metrics"]["ndcg@10"]
            record["valid"] = validation["metrics"]
            record["valid_flops_fraction"] = validation["flops"]["fraction_of_largest"]
            record["valid_histogram"] = validation["routing"]["histogram"]
            improved = run.best_score is None or score > run.best_score
            if improved:
                run.best_score, run.best_epoch = score, run.epoch
                run.validations_without_gain = 0
            else:
                run.validations_without_gain += 1
                if config.patience and run.validations_without_gain >= config.patience:
                    run.stopped_early = True
            run.history.append(record)
            if improved:
                run.save("best")
        else:
            run.history.append(record)
        run.save("last")
        log(_epoch_line(record, validation, run, config))
        if validation is not None and run.fixed_id is None:
            log("  routing (valid users): " + format_histogram(validation["routing"]["histogram"]))
    if run.stopped_early:
        log(f"early stop: no gain in {config.patience} validations; best epoch {run.best_epoch}")
    table = None
    if run.fixed_id is None and config.calibration_budgets and (run_dir / "best").is_dir():
        # Rank 0 alone (the others wait at the barrier below): the calibration evaluates the
        # validation users once per bisection step, and writes into best/.
        if main:
            table = _calibrate_best(run_dir / "best", config, data, run.device, log)
    if group is not None:
        group.barrier()  # best/ and last/ are complete before any rank reads them
    return TrainResult(
        run_dir, run.best_score, run.best_epoch, run.epoch, run.stopped_early,
        run.skipped_steps, run.history, table,
    )


def _calibrate_best(
    best: Path, config: TrainConfig, data: SequenceData, device: torch.device, log: Log
) -> BudgetTable:
    """Calibrate ``config.calibration_budgets`` on the validation users of the model in
    ``best`` and write the table into it (under the run's lock, which this process holds)."""
    loaded = ckpt.load_checkpoint(best)
    table = calibrate(
        loaded.model.to(device), data, config.calibration_budgets, "valid",
        batch_size=config.eval_batch_size, exclude_history=config.exclude_history,
    )
    ckpt.write_calibration(
        best, table, model_sha256=loaded.trainer_state["files_sha256"][ckpt.MODEL_FILE]
    )
    log(f"calibrated {len(table.points)} budgets on {table.num_users} validation users -> "
        f"{best / ckpt.CALIBRATION_FILE}")
    for point in table.points:
        log("  " + format_point(point, table.split))
    return table


def _epoch_line(
    record: dict[str, Any], validation: dict | None, run: _Run, config: TrainConfig
) -> str:
    line = f"epoch {record['epoch']}/{config.epochs}  loss {record['loss']:.4f}"
    if "guide" in record:
        line += (
            f" (next-item {record['next_item']:.4f}, guide {record['guide']:.3f}, "
            f"uniform {record['uniform']:.3f}"
            + (f", balance {record['balance']:.3f}" if "balance" in record else "")
            + f")  tau {record['tau']:.3f}"
        )
    if "flops" in record:
        line += (
            f"  flops {record['flops']:.4f} (expected {record['expected_flops']:.3f}, "
            f"target {config.flops_target:.2f})"
        )
    line += f"  lr {record['lr']:.2e}  skipped {record['skipped_steps']}"
    line += (
        f"  {record['train_seconds']:.1f}s ({record['steps_per_second']:.2f} steps/s, "
        f"{record['targets_per_second']:,.0f} targets/s)"
    )
    if validation is not None:
        best = " *" if run.best_epoch == record["epoch"] else ""
        line += f"  | valid ndcg@10 {validation['metrics']['ndcg@10']:.4f}{best}"
        line += f"  flops {100 * validation['flops']['fraction_of_largest']:.1f}% of largest"
    return line
