"""``canet recommend RUN_DIR --input FILE -k 10 --output recs.csv [--budget B] [--max-flops F]``.

Top-k items (external ids) for each history in FILE (an interaction log, or JSON: a list of
histories or a dict user -> history) through :class:`canet.Recommender`; writes the CSV
``user_id,item_id,score,rank`` atomically. ``--budget``/``--max-flops``: routing under a
serve-time compute budget (the run's calibration table) and a per-user cap.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings

from .._io import write_text_atomic
from ..errors import CanetError
from ..recommender import Recommender, read_histories
from .common import add_budget_arguments, budget_options, describe_budget

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (uses best/) or a checkpoint directory")
    parser.add_argument("--input", required=True,
                        help="histories: an interaction log, or JSON (list, or dict user -> list)")
    parser.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--output", required=True, help="CSV: user_id,item_id,score,rank")
    parser.add_argument("--backend", default="auto",
                        help="canet.Engine backend: auto (the default), torch, cpu, triton, or "
                        "model (as in evaluate: the PyTorch computation, the torch backend)")
    parser.add_argument("--include-history", action="store_true",
                        help="allow recommending items already in the history")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file (never the --input file)")
    add_budget_arguments(parser)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"recommend: unknown arguments {extra}")
    budget, max_flops = budget_options(args)
    _check_output(args.input, args.output, args.overwrite)
    histories = read_histories(args.input)
    recommender = Recommender.from_pretrained(
        args.run_dir, backend=args.backend, budget=budget, max_flops=max_flops
    )
    if not 1 <= args.k <= recommender.vocab.num_items:
        raise CanetError(f"-k must be in [1, {recommender.vocab.num_items}], got {args.k}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported per user below instead
        results = recommender.recommend(
            histories, k=args.k, exclude_history=not args.include_history, on_empty="skip"
        )
    for user, unknown in recommender.last_unknown.items():
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        print(f"canet: warning: {args.input}: user {user}: {len(unknown)} unknown item(s) "
              f"ignored: {shown}", file=sys.stderr)
    skipped = [user for user, items in results.items() if not items]
    for user in skipped:
        print(f"canet: warning: {args.input}: user {user}: no known item in the history, "
              "no recommendations", file=sys.stderr)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["user_id", "item_id", "score", "rank"])
    for user, items in results.items():
        for rank, (item, score) in enumerate(items, start=1):
            writer.writerow([user, item, f"{score:.6g}", rank])
    output = write_text_atomic(buffer.getvalue(), args.output)
    routing = ""
    fraction = recommender.last_flops_fraction
    if (budget is not None or max_flops is not None) and fraction is not None:
        asked = describe_budget(budget, max_flops)
        routing = f", {asked}: FLOPs {100 * fraction:.1f}% of largest"
    print(f"{len(results) - len(skipped)} users x top-{args.k} -> {output} "
          f"(backend {recommender.backend}{routing})")
    return 0


def _check_output(input_path: str, output: str, overwrite: bool) -> None:
    """Refuse, before any work, to replace the input (ever) or an existing file (without
    ``--overwrite``): recommendations written over the histories would lose them."""
    if os.path.realpath(output) == os.path.realpath(input_path) or (
        os.path.exists(output) and os.path.exists(input_path)
        and os.path.samefile(output, input_path)
    ):
        raise CanetError(
            f"--output {output} is the --input file; write the recommendations elsewhere"
        )
    if os.path.isdir(output):  # before loading anything, as the atomic writer would say
        raise CanetError(f"{output}: is a directory; expected a file path")
    if os.path.lexists(output) and not overwrite:
        raise CanetError(f"{output}: already exists; pass --overwrite to replace it")
