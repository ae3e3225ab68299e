"""``canet evaluate RUN_DIR --data LOG [--split test|valid] [--backend model|auto|...]
[--budget B] [--max-flops F]``.

Full-ranking metrics with standard errors, routing histogram and FLOPs of a trained run
(:func:`canet.evaluate.evaluate`), written to RUN_DIR/metrics.json (or ``--output``); with
``--ranks-out`` also each user's target rank, for ``canet compare``. Data whose split differs
from the run's training split (same users and items, other sequences) is refused unless
``--allow-different-data``. ``--budget``/``--max-flops`` route under a serve-time compute
budget (the run's calibration table, :mod:`canet.budget`) and a per-user cap.
"""

from __future__ import annotations

import argparse

from ..budget import check_routed
from ..checkpoint import load_checkpoint
from ..engine import routing_penalty
from ..errors import CanetError
from ..evaluate import evaluate, format_histogram
from .common import (
    add_budget_arguments,
    budget_options,
    describe_budget,
    load_run_data,
    output_dir,
)
from .output import write_metrics, write_ranks

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (uses best/) or a checkpoint directory")
    parser.add_argument("--data", required=True, help="the interaction log it was trained on")
    parser.add_argument(
        "--allow-different-data", action="store_true",
        help="evaluate even when the data's split differs from the one the run was trained on "
        "(same users and items, other sequences); a warning says so",
    )
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument(
        "--backend", default="model",
        help="'model' (the default: PyTorch model.score) or an Engine backend: auto, torch, ...",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--include-history", action="store_true",
                        help="do not exclude the input items from the ranking")
    parser.add_argument(
        "--shuffle-routing", type=int, metavar="SEED",
        help="random-routing baseline: deal the router's choices to the users in a seeded "
        "random order (same histogram, same FLOPs)",
    )
    add_budget_arguments(parser)
    parser.add_argument("--output", help="metrics file (default: RUN_DIR/metrics.json)")
    parser.add_argument(
        "--ranks-out", metavar="CSV",
        help="also write each user's target rank (user_id,item_id,rank; external ids, rank 1 = "
        "top) for paired comparisons between models: canet compare A.csv B.csv",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"evaluate: unknown arguments {extra}")
    if args.batch_size < 1:
        raise CanetError(f"--batch-size must be >= 1, got {args.batch_size}")
    budget, max_flops = budget_options(args)
    loaded = load_checkpoint(args.run_dir)
    config = loaded.config
    fixed_config_id = config.fixed_config_id(loaded.model.space)
    penalty = None
    budgeted = budget is not None or max_flops is not None
    if budgeted:
        check_routed(fixed_config_id, "--budget/--max-flops")
        # Before the data is read: a run without a calibration table is refused here.
        penalty = routing_penalty(loaded.model, budget, max_flops)
    data = load_run_data(args.data, loaded, "evaluate", args.allow_different_data)
    metrics = evaluate(
        loaded.model, data, args.split, ks=config.ks,
        exclude_history=config.exclude_history and not args.include_history,
        batch_size=args.batch_size, backend=args.backend,
        fixed_config_id=fixed_config_id,
        shuffle_routing_seed=args.shuffle_routing, per_user=args.ranks_out is not None,
        penalty=penalty,
    )
    if budgeted:
        metrics["routing"]["budget"] = {"budget": budget, "max_flops": max_flops,
                                        "lam": 0.0 if penalty is None else penalty.lam}
    metrics["checkpoint"] = str(loaded.path)
    per_user = metrics.pop("per_user", None)
    name = "metrics" + ("" if args.split == "test" else f"_{args.split}")
    if budget is not None:
        name += f"_budget-{budget:g}"
    if max_flops is not None:
        name += f"_max-flops-{max_flops:g}"
    if args.shuffle_routing is not None:
        name += f"_shuffled-routing-{args.shuffle_routing}"
    name += ".json"
    default = output_dir(args.run_dir, loaded) / name
    output = write_metrics(metrics, args.output or default)
    for name, value in metrics["metrics"].items():
        print(f"{name:>10} {value:.4f}  (s.e. {metrics['standard_errors'][name]:.4f})")
    print(f"users {metrics['num_users']}, items {metrics['num_items']}, backend "
          f"{metrics['backend']}, FLOPs {100 * metrics['flops']['fraction_of_largest']:.1f}% "
          f"of largest")
    if budgeted:
        asked = describe_budget(budget, max_flops)
        lam = 0.0 if penalty is None else penalty.lam
        print(f"{asked}: lambda {lam:.4g}, FLOPs achieved "
              f"{100 * metrics['flops']['fraction_of_largest']:.1f}% of largest "
              f"({args.split} users)")
    print(f"routing: {format_histogram(metrics['routing']['histogram'])}")
    print(f"-> {output}")
    if per_user is not None:
        print(f"-> {write_ranks(per_user, loaded.vocab, args.ranks_out)}")
    return 0
