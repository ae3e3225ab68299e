"""``canet pareto RUN_DIR --data LOG [--split test|valid] [--budgets B,...] [--against RUN2 ...]``.

The accuracy/compute Pareto report of a trained CANet run (:mod:`canet.pareto`): CANet at each
budget of its calibration table (or ``--budgets``), every fixed sub-network of its supernet,
random routing with each budget's histogram and the ``--against`` runs, on the same users,
with paired comparisons. Writes ``pareto.json``, ``pareto.md`` and (with matplotlib)
``pareto.png`` into ``--out`` (default ``RUN_DIR/pareto-<split>/``); progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from ..budget import check_routed
from ..checkpoint import load_checkpoint
from ..errors import CanetError
from ..pareto import AgainstRun, check_budgets, pareto_report, write_report
from .common import load_run_data, output_dir, parse_budget_list

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a CANet run directory (uses best/) or checkpoint")
    parser.add_argument("--data", required=True, help="the interaction log it was trained on")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument(
        "--budgets", metavar="B1,B2,...",
        help="comma-separated budgets in (0, 1] (mean FLOPs per user over the largest "
        "sub-network's); default: the run's calibration table's",
    )
    parser.add_argument("--shuffles", type=int, default=3,
                        help="random-routing shuffles per budget (seeds 0..N-1)")
    parser.add_argument(
        "--against", nargs="+", default=[], metavar="RUN2",
        help="other runs trained on the same log (fixed configs, the full-size model, another "
        "CANet), each evaluated at its own FLOPs",
    )
    parser.add_argument("--backend", default="auto",
                        help="'model' (PyTorch model.score) or an Engine backend: auto, torch, ...")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", help="output directory (default: RUN_DIR/pareto-<split>/)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"pareto: unknown arguments {extra}")
    if args.shuffles < 1:
        raise CanetError(f"--shuffles must be >= 1, got {args.shuffles}")
    if args.batch_size < 1:
        raise CanetError(f"--batch-size must be >= 1, got {args.batch_size}")
    requested = None if args.budgets is None else parse_budget_list(args.budgets)
    loaded = load_checkpoint(args.run_dir)
    config = loaded.config
    check_routed(config.fixed_config_id(loaded.model.space), "a Pareto report")
    table = loaded.model.budget_table
    if table is None:
        raise CanetError(
            f"{args.run_dir} has no calibration table: run `canet calibrate {args.run_dir} "
            f"--data {args.data}`"
        )
    budgets = check_budgets(table.budgets if requested is None else requested, table)
    data = load_run_data(args.data, loaded, "report")
    against = []
    for other_dir in args.against:
        other = load_checkpoint(other_dir)
        try:  # read with the other run's own data options (max_len ...), checked as evaluate's
            other_data = load_run_data(args.data, other, "compare runs")
        except CanetError as error:
            raise CanetError(f"--against {other_dir}: {error}") from None
        against.append(AgainstRun(other_dir, other.model,
                                  other.config.fixed_config_id(other.model.space), other_data))
    out = Path(args.out) if args.out else (
        output_dir(args.run_dir, loaded) / f"pareto-{args.split}")
    # Before the minutes of evaluation: an output that cannot be written fails now.
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise CanetError(f"{out}: output directory is not writable")
    report = pareto_report(
        loaded.model, data, table, split=args.split, budgets=budgets, shuffles=args.shuffles,
        against=against, backend=args.backend, batch_size=args.batch_size,
        ks=tuple(config.ks), exclude_history=config.exclude_history,
        run={"path": args.run_dir, "checkpoint": str(loaded.path), "data": args.data},
    )
    report["command"] = _command_line(args, budgets)
    for line in _summary(report):
        print(line)
    for path in write_report(report, out):
        print(f"-> {path}")
    return 0


def _command_line(args: argparse.Namespace, budgets: list[float]) -> str:
    """The command that reproduces this report (every option spelled out)."""
    words = ["canet", "pareto", args.run_dir, "--data", args.data, "--split", args.split,
             "--budgets", ",".join(f"{b:g}" for b in budgets), "--shuffles", str(args.shuffles)]
    if args.against:
        words += ["--against", *args.against]
    words += ["--backend", args.backend, "--batch-size", str(args.batch_size)]
    if args.out:
        words += ["--out", args.out]
    return shlex.join(words)


def _summary(report: dict) -> list[str]:
    lines = []
    for row in report["budgets"]:
        lines.append(f"budget {row['budget']:g}: NDCG@10 {row['ndcg@10']:.4f}, FLOPs "
                     f"{row['flops_fraction']:.3f} ({row['flops_fraction_with_router']:.3f} "
                     "with the router)")
        for c in report["comparisons"]:
            if c["budget"] != row["budget"]:
                continue
            if c["verdict"] is None:
                lines.append(f"  vs {c['kind']}: {c['note']}")
            else:
                lines.append(f"  vs {c['other']}: {c['difference']:+.4f} "
                             f"[{c['low']:+.4f}, {c['high']:+.4f}]: {c['verdict']}")
    return lines
