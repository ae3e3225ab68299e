"""Training and evaluation on many processes: torchrun + DistributedDataParallel.

``torchrun --nproc-per-node N -m canet train ...`` starts N processes with the environment
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (over
several machines, torchrun's rendezvous flags set them the same way). :func:`environment` reads
them; :func:`start` opens the process group from them (``init_process_group("env://")``):
backend ``nccl`` when the run trains on CUDA (rank -> ``cuda:LOCAL_RANK``), ``gloo`` on CPUs.
Without that environment canet runs as one plain process, as it always did.

How a step is split (``canet.train``): every rank draws the same global batch (the same data
generator, seeded by the run's seed) and takes a contiguous share of it (:func:`share`: sizes
differ by at most one, no padding). Each rank's loss is its share of the global loss (the sum
over its targeted positions divided by the GLOBAL count, which every rank computes on the host
from the global batch: the all-reduced count without a collective), so that DDP's gradient
average times the world size is the gradient of one process on the same global batch.

Evaluation (``canet.evaluate``) splits the users in whole evaluation batches (:func:`batch_share`);
the ranks' per-user integer ranks are gathered in user order, so every rank computes exactly the
metrics of one process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .errors import CanetError

__all__ = [
    "DistEnvironment",
    "DistributedError",
    "Group",
    "ReportedElsewhere",
    "agreed",
    "batch_mean",
    "batch_share",
    "environment",
    "replicated_share",
    "share",
    "start",
    "started",
    "stopped_by_peer",
]

# Seconds a collective waits for the other ranks before it fails (``canet train --dist-timeout``):
# a rank that hangs (or died without closing its connections, as on NCCL) stops the job within it.
# Long enough for what rank 0 does alone while the others wait (checkpoints, the calibration of
# the serve-time budgets at the end of training).
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(CanetError):
    """A distributed run cannot start or go on (bad environment, a failed or silent rank)."""


def stopped_by_peer(error: BaseException, rank: int) -> DistributedError | None:
    """The one-line error of a rank whose collective failed because another rank did (it
    died: gloo's "Connection closed by peer"; or the group's timeout passed), or None when
    ``error`` is not such a failure (then it is this rank's own)."""
    text = str(error)
    if not (isinstance(error, torch_dist.DistError) or "/gloo/" in text):
        return None
    first = (text.strip().splitlines() or [type(error).__name__])[0]
    return DistributedError(
        f"rank {rank} stopped: a collective with the other ranks failed (another rank failed: "
        f"see its error; or it did not answer within the timeout, --dist-timeout): {first[:300]}"
    )


class ReportedElsewhere(CanetError):
    """This rank stops because of an error another rank reports (the command line prints
    nothing more for it: the error is shown once, by the rank that has it)."""


@dataclass(frozen=True)
class DistEnvironment:
    """What torchrun told this process: its rank among ``world_size`` and on its machine."""

    rank: int
    world_size: int
    local_rank: int


def environment() -> DistEnvironment | None:
    """The torchrun environment of this process, or None for a plain process (no ``RANK`` /
    ``WORLD_SIZE`` set). DistributedError when the variables are partial or malformed."""
    present = [key for key in _ENV_KEYS if os.environ.get(key)]
    if not any(key in present for key in ("RANK", "WORLD_SIZE")):
        return None
    missing = [key for key in _ENV_KEYS if key not in present]
    if missing:
        raise DistributedError(
            f"a distributed run needs the environment variables {', '.join(_ENV_KEYS)} (torchrun "
            f"sets them), but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "set; start it with `torchrun --nproc-per-node N -m canet train ...`"
        )
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ[key]
        try:
            values[key] = int(raw)
        except ValueError:
            raise DistributedError(
                f"environment variable {key} must be an int, got {raw!r}"
            ) from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local} (expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)"
        )
    return DistEnvironment(rank, world, local)


@dataclass(frozen=True)
class Group:
    """The process group of a distributed run, as the training loop and evaluation use it.

    ``device``: where this rank computes (and where NCCL wants its tensors)."""

    rank: int
    world_size: int
    backend: str
    device: torch.device  # cuda:LOCAL_RANK under NCCL

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes the run directory and prints the log."""
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over the ranks, in place (moved to the group's device and back)."""
        on_device = tensor.to(self.device)
        torch_dist.all_reduce(on_device, op=torch_dist.ReduceOp.SUM)
        if on_device is not tensor:
            tensor.copy_(on_device)
        return tensor

    def any(self, flag: Tensor) -> Tensor:
        """Whether ``flag`` (a 0-d bool tensor) is true on any rank (one small all-reduce)."""
        value = flag.to(device=self.device, dtype=torch.int32).reshape(1)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return value[0].bool()

    def gather_rows(self, local: Tensor, sizes: list[int]) -> Tensor:
        """Concatenate, in rank order, every rank's rows: ``local [sizes[rank], ...]`` ->
        ``[sum(sizes), ...]`` on every rank (CPU). Every rank knows the sizes (they follow from
        the split), so nothing but the rows travels."""
        width = max(sizes)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).cpu()

    def barrier(self) -> None:
        """Wait for every rank (within the group's timeout)."""
        if self.backend == "nccl":
            torch_dist.barrier(device_ids=[self.device.index])
        else:
            torch_dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """A collective check after a phase every rank ran (setup, the run directory): if any
        rank failed, the lowest failing rank raises its own error and every other rank raises
        :class:`ReportedElsewhere`, so the message is shown once and no rank waits for the rest
        at the next collective."""
        failed = torch.tensor([error is not None], dtype=torch.int32)
        ranks = self.gather_rows(failed, [1] * self.world_size)  # one flag per rank
        failing = torch.nonzero(ranks).flatten().tolist()
        if not failing:
            return
        if error is not None and failing[0] == self.rank:
            raise error
        raise ReportedElsewhere(f"rank {failing[0]} failed")

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def agreed(group: Group | None, phase: Callable[[], T]) -> T:
    """``phase()`` on every rank, then :meth:`Group.agree` on its outcome: if it raised a
    CanetError on some rank, every rank stops (the error shown once). Without a group, just
    ``phase()``. Other exceptions (bugs) propagate unshared: the job stops when the rank
    exits."""
    if group is None:
        return phase()
    try:
        result = phase()
    except CanetError as error:
        group.agree(error)
        raise
    group.agree(None)
    return result


_started = False  # whether this process opened a process group (start())


def started() -> bool:
    """Whether this process has opened a process group (see :func:`start`)."""
    return _started


def start(
    env: DistEnvironment, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Group:
    """Open the process group of ``env`` (``init_process_group`` with ``env://``): NCCL when
    ``device`` is CUDA (this rank then computes on ``cuda:LOCAL_RANK``), gloo otherwise.
    Every collective fails after ``timeout_s`` seconds without the other ranks."""
    if not torch_dist.is_available():
        raise DistributedError(
            f"this torch build ({torch.__version__}) has no torch.distributed; a distributed "
            "run needs one"
        )
    if not timeout_s > 0:
        raise DistributedError(f"the process group timeout must be > 0 seconds, got {timeout_s}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise DistributedError(
                f"rank {env.rank} has LOCAL_RANK {env.local_rank}, but this machine has {count} "
                "CUDA device(s); start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    options = {}
    if backend == "nccl":
        options["device_id"] = device  # binds the communicator now: no lazy, hidden init later
    global _started
    _started = True
    torch_dist.init_process_group(
        backend, init_method="env://", rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s), **options,
    )
    return Group(env.rank, env.world_size, backend, device)


def share(total: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` items: sizes differ by at most one, the
    first ``total % world_size`` ranks take one more; nothing padded or repeated (a rank's
    share is empty when ``total < world_size``)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def batch_share(total: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` items in whole batches of ``batch_size``
    (:func:`share` of the batches; the last batch may be short): every item lands in the very
    batch it is in on one process, so a computation that is not batch-invariant to the last
    bit (the scores' GEMMs) gives each item exactly one process's result."""
    batches = share(-(-total // batch_size), rank, world_size)
    return slice(min(total, batches.start * batch_size), min(total, batches.stop * batch_size))


def batch_mean(samples: int, weight: float = 1.0) -> Callable[[Tensor], Tensor]:
    """The mean over a GLOBAL batch of ``samples`` rows, for a batch-level loss term (one that
    is not a mean of per-sample terms: the balance and FLOPs-target losses), from this rank's
    rows ``[b, ...]`` (times ``weight``: 0 for a rank that computes a stand-in window).

    The forward value is the global mean on every rank (an all-reduce of the detached row sums);
    the gradient flows into this rank's rows only. A term computed from it has the same value on
    every rank; pass it through :func:`replicated_share` so that the ranks' values and
    gradients add up to the term's value and gradient on one process."""

    def mean(rows: Tensor) -> Tensor:
        local = rows.sum(0) * weight
        total = local.detach().clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return (local + (total - local.detach())) / samples

    return mean


def replicated_share(term: Tensor, world_size: int) -> Tensor:
    """A term every rank computes alike from :func:`batch_mean` statistics, as this rank's
    share: value ``term / world_size`` (the ranks' values add up to the term), gradient that of
    ``term`` through this rank's rows (the ranks' gradients add up to the term's)."""
    value = term.detach()
    return term - value + value / world_size
