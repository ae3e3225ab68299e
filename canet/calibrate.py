"""Calibration of serve-time budgets: the routing penalty of each budget, measured on a split.

:func:`calibrate` computes the router logits of a split's users (validation, by default) once,
finds each budget's penalty ``lam`` by bisection (:func:`canet.budget.calibrate_lambda`: the
smallest ``lam`` whose routing of those users has a mean FLOPs fraction at or under the
budget), and measures the NDCG@10 of each budget's routing with :func:`canet.evaluate.evaluate`.
The result is a :class:`canet.budget.BudgetTable`; a checkpoint stores it as
``calibration.json`` (:func:`canet.checkpoint.write_calibration`), written at the end of
training and by ``canet calibrate`` (:mod:`canet.cli.calibrate`), and
``Engine(model, budget=b)`` looks budgets up in it.

Budget 1.0 is always in the table with ``lam = 0``: the router's own routing, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .budget import (
    DEFAULT_BUDGETS,
    BudgetError,
    BudgetPoint,
    BudgetTable,
    RoutingPenalty,
    calibrate_lambda,
    check_achievable,
    distinct_budgets,
    smallest_penalty,
)
from .data import SequenceData
from .evaluate import check_model_data, evaluate
from .model import CANet

__all__ = ["DEFAULT_BUDGETS", "calibrate", "format_point", "resolve_budgets", "router_logits"]


def resolve_budgets(budgets: Sequence[object], smallest: float) -> tuple[float, ...]:
    """The budgets to calibrate, checked, in increasing order, with 1.0 added.

    Each must be a number in (0, 1] (:func:`canet.budget.check_budget`), none twice, none below
    ``smallest`` (the smallest achievable budget: every user on the cheapest config), else
    BudgetError naming the first bad one. :data:`DEFAULT_BUDGETS` is the exception to the last
    rule: its budgets below ``smallest`` are left out silently (they fit no model in general).
    """
    default = tuple(budgets) == DEFAULT_BUDGETS
    values = distinct_budgets(budgets)
    if not default:
        for value in values:
            check_achievable(value, smallest)
    return tuple(sorted({value for value in values if value >= smallest} | {1.0}))


def router_logits(model: CANet, data: SequenceData, split: str, batch_size: int) -> torch.Tensor:
    """Router logits ``[U, C]`` (the model's dtype and device) of the users with a ``split``
    target, in ascending user order, batched as :func:`canet.evaluate.evaluate` routes them.
    The model runs in eval mode (its mode is restored)."""
    check_model_data(model, data)
    device = model.supernet.out.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # In the model's dtype: routing compares these logits exactly as the model and
            # every backend do (route_with_penalty is exact in float64 for any float dtype);
            # rounding float64 logits to float32 here moved users across ties.
            parts = [model.router(seqs.to(device))
                     for _, seqs, _ in data.eval_batches(split, batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        raise BudgetError(f"no users with a {split} target to calibrate on")
    return torch.cat(parts)


def calibrate(
    model: CANet,
    data: SequenceData,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    split: str = "valid",
    *,
    batch_size: int = 256,
    exclude_history: bool = True,
) -> BudgetTable:
    """Calibrate ``budgets`` on the users of ``split``: per budget the penalty ``lam``, the
    mean FLOPs fraction its routing achieves on them (at or under the budget) and their
    NDCG@10 (one evaluation per distinct ``lam``; ``exclude_history`` as in evaluate).

    ``budgets`` are checked by :func:`resolve_budgets` (BudgetError); 1.0 is always included.
    Calibrated without a per-user cap: a cap given at serve time only removes configs, so the
    mean can only fall below the budget. Deterministic; the model's train/eval mode is left as
    it was.
    """
    fractions = model.flops_fractions
    smallest = min(fractions)
    chosen = resolve_budgets(budgets, smallest)
    logits = router_logits(model, data, split, batch_size)
    calibrated = [(budget, *calibrate_lambda(logits, fractions, budget)) for budget in chosen]
    ndcg: dict[float, float] = {}
    for _, lam, _ in calibrated:
        if lam not in ndcg:  # budgets whose routing is the same need one evaluation
            metrics = evaluate(
                model, data, split, ks=(10,), exclude_history=exclude_history,
                batch_size=batch_size, penalty=RoutingPenalty(lam),
            )
            ndcg[lam] = metrics["metrics"]["ndcg@10"]
    points = tuple(BudgetPoint(budget, lam, achieved, ndcg[lam])
                   for budget, lam, achieved in calibrated)
    return BudgetTable(
        points, smallest, smallest_penalty(logits, fractions), split,
        int(logits.shape[0]),
    )


def format_point(point: BudgetPoint, split: str) -> str:
    """``"budget 0.30: lambda 0.123, FLOPs 29.8% (valid), ndcg@10 0.0712"``."""
    ndcg = "n/a" if point.ndcg10 is None else f"{point.ndcg10:.4f}"
    return (f"budget {point.budget:.2f}: lambda {point.lam:.4g}, FLOPs "
            f"{100 * point.flops_fraction:.1f}% ({split}), ndcg@10 {ndcg}")
