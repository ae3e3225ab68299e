"""``canet calibrate RUN_DIR --data LOG [--budgets 0.1,0.2,...] [--split valid|test]
[--batch-size N]``.

Calibrates serve-time compute budgets of a trained (routed) run on the users of a split
(:func:`canet.calibrate.calibrate`: per budget the routing penalty, the FLOPs fraction it
achieves and NDCG@10) and writes the table into the checkpoint as calibration.json (a run
directory's best/; :func:`canet.checkpoint.write_calibration`), replacing the one training
wrote. The data must be the run's training data (as for ``canet evaluate``). Refused while a
``canet train`` writes into the run directory, and for a fixed-config run.
"""

from __future__ import annotations

import argparse

from ..budget import DEFAULT_BUDGETS, check_routed
from ..calibrate import calibrate, format_point
from ..checkpoint import (
    CALIBRATION_FILE,
    MODEL_FILE,
    load_checkpoint,
    lock_checkpoint,
    write_calibration,
)
from ..errors import CanetError
from .common import load_run_data, parse_budget_list

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (writes into best/) or a checkpoint "
                        "directory")
    parser.add_argument("--data", required=True, help="the interaction log it was trained on")
    parser.add_argument(
        "--budgets", metavar="B1,B2,...",
        help="budgets in (0, 1], comma-separated (default: "
        + ",".join(f"{b:g}" for b in DEFAULT_BUDGETS)
        + ", without those below the model's smallest achievable budget); 1 is always added",
    )
    parser.add_argument("--split", choices=("valid", "test"), default="valid",
                        help="the users to calibrate on (default: valid; choose on validation)")
    parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"calibrate: unknown arguments {extra}")
    if args.batch_size < 1:
        raise CanetError(f"--batch-size must be >= 1, got {args.batch_size}")
    budgets = DEFAULT_BUDGETS if args.budgets is None else parse_budget_list(args.budgets)
    loaded = load_checkpoint(args.run_dir)
    config = loaded.config
    check_routed(config.fixed_config_id(loaded.model.space), "calibration")
    # Held from here to the write: a `canet train` into the run is refused before the data is
    # read, not after the calibration (write_calibration takes the same lock again).
    with lock_checkpoint(loaded.path):
        data = load_run_data(args.data, loaded, "calibrate")
        table = calibrate(
            loaded.model, data, budgets, args.split, batch_size=args.batch_size,
            exclude_history=config.exclude_history,
        )
        path = write_calibration(
            loaded.path, table,
            model_sha256=loaded.trainer_state.get("files_sha256", {}).get(MODEL_FILE),
        )
    print(f"calibrated {len(table.points)} budgets on {table.num_users} {table.split} users "
          f"(smallest achievable budget {table.smallest_fraction:.4f})")
    for point in table.points:
        print(format_point(point, table.split))
    print(f"-> {path / CALIBRATION_FILE}")
    return 0
