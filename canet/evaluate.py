"""Evaluation: full-ranking leave-one-out metrics, routing and FLOPs of a model on a split.

Protocol (also written into every metrics file): each user with >= 3 interactions has one
target per split (test: the last item, valid: the second to last); the input is the last
``max_len`` items before it. Every one of the N items is ranked (no sampled negatives); padding
is never a candidate; by default the items of the input window are excluded (as the paper's
code), so a repeated target counts as a miss. Ties rank optimistically (``canet.metrics``).
Scores come from the PyTorch model (``model.score``) or from ``canet.Engine`` with any backend;
both route with the router's argmax: the torch backend gives identical metrics, the native ones
agree up to float rounding (a near-tie in routing or ranking can flip).

``canet evaluate`` (:mod:`canet.cli.evaluate`) runs it on a trained run from the command line.
"""

from __future__ import annotations

from typing import Any

import torch

from . import distributed
from .budget import BudgetError, RoutingPenalty
from .data import SequenceData
from .distributed import Group
from .engine import Engine
from .errors import CanetError
from .flops import batch_flops, flops, flops_router
from .metrics import MetricAccumulator, target_ranks
from .metrics import exclude_history as exclude_input
from .model import CANet

__all__ = ["check_model_data", "evaluate", "format_histogram"]


def check_model_data(model: CANet, data: SequenceData) -> None:
    """CanetError unless ``data`` has the model's items and window length."""
    if model.num_items != data.num_items or model.max_len != data.max_len:
        raise CanetError(
            f"model expects {model.num_items} items and max_len {model.max_len}, but the data has "
            f"{data.num_items} items and max_len {data.max_len}; evaluate on the data it was "
            "trained on (same file and filters)"
        )


def evaluate(
    model: CANet,
    data: SequenceData,
    split: str = "test",
    *,
    ks: tuple[int, ...] | list[int] = (5, 10, 20),
    exclude_history: bool = True,
    batch_size: int = 256,
    backend: str = "model",
    engine: Engine | None = None,
    fixed_config_id: int | None = None,
    shuffle_routing_seed: int | None = None,
    per_user: bool = False,
    penalty: RoutingPenalty | None = None,
    group: Group | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` of ``data`` as a JSON-able dict.

    ``backend="model"`` scores with ``model.score``; any other value (or ``engine``) scores
    through ``canet.Engine``. ``fixed_config_id`` routes every user to that config (the
    full-size baseline); ``shuffle_routing_seed`` takes the router's choices for the whole
    split and deals them out to the users in a seeded random order: the random-routing
    baseline with exactly the router's histogram (and so its FLOPs). Otherwise the router's
    argmax decides, biased by ``penalty`` (a serve-time budget: :mod:`canet.budget`) when given
    (an ``engine`` passed in routes with its own penalty instead). Results do not depend on
    ``batch_size``. Keys: ``split``, ``metrics`` ({"ndcg@10": ...}), ``standard_errors`` (of
    each metric's mean over users: the resolution of the test set), ``num_users``,
    ``num_items``, ``protocol``, ``routing`` (histogram over config ids), ``flops``, ``backend``;
    with ``per_user`` also ``per_user``: {"users", "targets", "ranks"}, int64 numpy arrays
    ``[U]`` of internal user ids, internal target item ids and 0-based target ranks, in
    ascending user order (for paired comparisons: :func:`canet.metrics.paired_difference`).

    ``group`` (a distributed run, :mod:`canet.distributed`): each rank scores a contiguous
    share of the users in whole batches of ``batch_size`` (none padded or repeated; each user
    in the batch one process puts it in); the ranks' per-user ranks and routed configs are
    gathered in user order and every rank returns exactly what one process returns (at the
    same thread count).
    """
    check_model_data(model, data)
    space = model.space
    if fixed_config_id is not None and not 0 <= fixed_config_id < space.n_configs:
        raise CanetError(
            f"config id must be in [0, {space.n_configs - 1}], got {fixed_config_id}"
        )
    if fixed_config_id is not None and shuffle_routing_seed is not None:
        raise CanetError("choose either a fixed config or shuffled routing, not both")
    if penalty is not None and not isinstance(penalty, RoutingPenalty):
        raise BudgetError(
            f"penalty must be a canet.budget.RoutingPenalty or None, got {type(penalty).__name__}"
        )
    if penalty is not None and fixed_config_id is not None:
        raise CanetError("a routing penalty (budget) does not apply to a fixed config")
    if engine is not None and penalty is not None:
        raise CanetError("pass the routing penalty to the Engine, not to evaluate() with it")
    if group is not None and shuffle_routing_seed is not None:
        raise CanetError("shuffled routing deals the whole split's configs: evaluate it on one "
                         "process, not sharded")
    if penalty is not None and penalty.is_identity:
        penalty = None  # the router's own argmax, reported as no penalty (as an Engine does)
    if engine is None and backend != "model":
        engine = Engine(model, backend=backend, penalty=penalty)
    if group is not None:  # whole batches: each user scored in one process's batch
        total = len(data.eval_users(split))
        shares = [distributed.batch_share(total, batch_size, rank, group.world_size)
                  for rank in range(group.world_size)]
    was_training = model.training
    model.eval()
    device = model.supernet.out.weight.device
    accumulator = MetricAccumulator(ks)
    collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if engine is not None:
        route = engine.route
        penalty = engine.penalty
    else:
        def route(seqs: torch.Tensor) -> torch.Tensor:
            return model.route(seqs, penalty)
    try:
        with torch.inference_mode():
            dealt = None
            if shuffle_routing_seed is not None:
                routed = torch.cat(
                    [route(seqs.to(device)) for _, seqs, _ in data.eval_batches(split, batch_size)]
                )
                generator = torch.Generator().manual_seed(shuffle_routing_seed)
                dealt = routed[torch.randperm(len(routed), generator=generator).to(device)]
            start = 0
            part = None if group is None else shares[group.rank]
            for users, seqs, targets in data.eval_batches(split, batch_size, part):
                seqs = seqs.to(device)
                if fixed_config_id is not None:
                    config_ids = torch.full((seqs.shape[0],), fixed_config_id, device=device)
                elif dealt is not None:
                    config_ids = dealt[start : start + seqs.shape[0]]
                else:
                    config_ids = route(seqs)
                start += seqs.shape[0]
                if engine is not None:
                    scores = engine.score(seqs, config_ids)
                else:
                    scores = model.score(seqs, config_ids)
                if exclude_history:
                    scores = exclude_input(scores, seqs)
                ranks = target_ranks(scores.float(), targets.to(device)).cpu()
                collected.append((users, targets, ranks, config_ids.cpu()))
    finally:
        model.train(was_training)
    if collected:  # users, targets, ranks, routed configs: int64 [U] each
        columns = [torch.cat(parts) for parts in zip(*collected, strict=True)]
    else:  # no user here (a rank's share of fewer users than ranks)
        columns = [torch.zeros(0, dtype=torch.int64) for _ in range(4)]
    if group is not None:  # every rank gets every user's row, in user order
        sizes = [share.stop - share.start for share in shares]
        columns = [group.gather_rows(column, sizes) for column in columns]
    users, targets, ranks, routed = columns
    # Added in batch_size chunks as one process does: the same float64 sums, bit for bit.
    for first in range(0, len(ranks), batch_size):
        accumulator.add(ranks[first : first + batch_size])
    histogram = torch.bincount(routed, minlength=space.n_configs)
    results = accumulator.compute()
    num_users = int(results.pop("num_users"))
    standard_errors = accumulator.standard_errors()
    counts = histogram.tolist()
    mean_flops = batch_flops(counts, space, model.max_len, model.num_items) / num_users
    largest = flops(space.configs[space.largest_id], model.max_len, model.num_items)
    router = (
        flops_router(model.max_len, space.n_configs, model.arch["router_dim"])
        if fixed_config_id is None and shuffle_routing_seed is None
        else 0
    )
    if fixed_config_id is not None:
        mode = f"fixed config {fixed_config_id}"
    elif shuffle_routing_seed is not None:
        mode = f"router's histogram dealt to users at random (seed {shuffle_routing_seed})"
    else:
        mode = "router argmax"
    if penalty is not None and not penalty.is_identity and fixed_config_id is None:
        mode += f" - {penalty.lam:.6g} x FLOPs fraction"
        if penalty.max_flops is not None:
            mode += f", configs above {penalty.max_flops:g} of the largest's FLOPs excluded"
    metrics = {
        "split": split,
        "metrics": results,
        "standard_errors": standard_errors,
        "num_users": num_users,
        "num_items": model.num_items,
        "protocol": {
            "ranking": "full ranking over all items (no sampled negatives)",
            "split": "leave-one-out: test = last item, valid = second to last",
            "input": f"last {model.max_len} items before the target, left-padded",
            "padding_excluded": True,
            "exclude_history": (
                "items of the input window excluded (as the paper's code)"
                if exclude_history else False
            ),
            "ties": "optimistic (rank = number of strictly higher scores)",
            "ks": list(ks),
        },
        "routing": {
            "mode": mode,
            "histogram": counts,
            "penalty": None if penalty is None or fixed_config_id is not None else {
                "lam": penalty.lam, "max_flops": penalty.max_flops},
            "configs": [[c.depth, c.hidden, c.emb] for c in space.configs],
        },
        "flops": {
            "mean_per_user": mean_flops,
            "largest_per_user": largest,
            "fraction_of_largest": mean_flops / largest,
            "reduction_vs_largest": 1.0 - mean_flops / largest,
            "router_per_user": router,
            "reduction_vs_largest_with_router": 1.0 - (mean_flops + router) / largest,
        },
        "backend": "model" if engine is None else engine.backend,
    }
    if per_user:
        metrics["per_user"] = {
            "users": users.numpy(), "targets": targets.numpy(), "ranks": ranks.numpy()}
    return metrics


def format_histogram(histogram: list[int], top: int = 8) -> str:
    """``"c5 40% (123), c0 12% (37), ..."``: the most used configs first."""
    total = sum(histogram) or 1
    used = sorted(
        ((count, config_id) for config_id, count in enumerate(histogram) if count),
        reverse=True,
    )
    shown = [f"c{i} {100 * n / total:.0f}% ({n})" for n, i in used[:top]]
    if len(used) > top:
        shown.append(f"+{len(used) - top} more configs")
    return ", ".join(shown) if shown else "(no users)"
