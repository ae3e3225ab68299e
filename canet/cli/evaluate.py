"""``canet evaluate RUN_DIR --data LOG [--split test|valid] [--backend model|auto|...]``.

Full-ranking metrics with standard errors, routing histogram and FLOPs of a trained run
(:func:`canet.evaluate.evaluate`), written to RUN_DIR/metrics.json (or ``--output``); with
``--ranks-out`` also each user's target rank, for ``canet compare``. Data whose split differs
from the run's training split (same users and items, other sequences) is refused unless
``--allow-different-data``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..data import load_dataset
from ..errors import CanetError
from ..evaluate import evaluate, format_histogram
from .output import write_metrics, write_ranks
from .rundata import check_training_data

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
    loaded = load_checkpoint(args.run_dir)
    config = loaded.config
    data = load_dataset(args.data, **config.dataset_options())
    changed = check_training_data(
        loaded, data, args.data, allow_different_data=args.allow_different_data
    )
    if changed:
        print(f"canet: warning: {args.data}: {changed}; these metrics are of another split",
              file=sys.stderr)
    metrics = evaluate(
        loaded.model, data, args.split, ks=config.ks,
        exclude_history=config.exclude_history and not args.include_history,
        batch_size=args.batch_size, backend=args.backend,
        fixed_config_id=config.fixed_config_id(loaded.model.space),
        shuffle_routing_seed=args.shuffle_routing, per_user=args.ranks_out is not None,
    )
    metrics["checkpoint"] = str(loaded.path)
    per_user = metrics.pop("per_user", None)
    run_dir = Path(args.run_dir)
    name = "metrics" + ("" if args.split == "test" else f"_{args.split}")
    if args.shuffle_routing is not None:
        name += f"_shuffled-routing-{args.shuffle_routing}"
    name += ".json"
    default = (run_dir if (run_dir / "best").exists() or (run_dir / "last").exists()
               else loaded.path) / name
    output = write_metrics(metrics, args.output or default)
    for name, value in metrics["metrics"].items():
        print(f"{name:>10} {value:.4f}  (s.e. {metrics['standard_errors'][name]:.4f})")
    print(f"users {metrics['num_users']}, items {metrics['num_items']}, backend "
          f"{metrics['backend']}, FLOPs {100 * metrics['flops']['fraction_of_largest']:.1f}% "
          f"of largest")
    print(f"routing: {format_histogram(metrics['routing']['histogram'])}")
    print(f"-> {output}")
    if per_user is not None:
        print(f"-> {write_ranks(per_user, loaded.vocab, args.ranks_out)}")
    return 0
