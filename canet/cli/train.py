"""``canet train --data LOG --out RUN_DIR [--config cfg.yaml] [--key value ...]``.

Trains into RUN_DIR (:func:`canet.train.train`: config.yaml, best/, last/), then writes the test
metrics of best/ to RUN_DIR/metrics.json unless ``--no-test``. Every config key is also a flag
(``--key value`` or ``--key=value``); ``--resume RUN_DIR`` continues RUN_DIR/last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import config_from_dict, load_config, read_yaml
from ..config import parse_overrides as parse_config_overrides
from ..data import load_dataset
from ..errors import CanetError, CheckpointError
from ..evaluate import evaluate
from ..train import train
from .output import write_metrics

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="interaction log (any supported format)")
    parser.add_argument("--out", help="run directory (checkpoints, config, metrics)")
    parser.add_argument("--config", help="YAML config file (keys: see docs/training.md)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR/last")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a directory that already holds one")
    parser.add_argument("--no-test", action="store_true",
                        help="skip the final test evaluation of best/")
    parser.epilog = (
        "Any config key can be given as --key value or --key=value, e.g. --epochs 3 "
        "--fixed-config largest --lr=1e-3 (see docs/training.md)."
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """``canet train``: returns the exit status."""
    overrides = parse_config_overrides(extra)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise CanetError(f"--out {args.out} differs from --resume {args.resume}")
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir / 'last'}: no checkpoint to resume from")
    else:
        if not args.out:
            raise CanetError("train needs --out RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(args.out)
    with contextlib.ExitStack() as held:
        # The run directory's writer lock is held from here to metrics.json, so a second
        # `canet train` into it is refused before it loads the data (when the directory
        # already exists; a new one is created, and locked, only once config and data are good).
        if run_dir.is_dir():
            held.enter_context(ckpt.lock_run_dir(run_dir))
        if args.resume:
            last = run_dir / "last"
            ckpt.cleanup_leftovers(run_dir)
            if not last.exists():
                raise CheckpointError(f"{last}: no checkpoint to resume from")
            config = ckpt.load_checkpoint(last).config
            if args.config:
                config = config_from_dict(read_yaml(args.config), config, source=args.config)
            if overrides:
                config = config_from_dict(overrides, config, source="command line")
        else:
            config = load_config(args.config, overrides)
        config.torch_device()  # an unavailable device fails before the data is read
        data = load_dataset(args.data, **config.dataset_options())
        held.enter_context(ckpt.lock_run_dir(run_dir))
        return _train_and_test(args, config, data, run_dir)


def _train_and_test(args: argparse.Namespace, config, data, run_dir: Path) -> int:
    result = train(config, data, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    print(
        f"done: {result.epochs_done} epochs, best valid ndcg@10 "
        f"{result.best_score if result.best_score is None else round(result.best_score, 4)} "
        f"at epoch {result.best_epoch}, skipped steps {result.skipped_steps}; training "
        f"{result.train_seconds:.1f}s, {result.targets_per_second:,.0f} targets/s"
    )
    if not args.no_test and result.best_epoch is not None:
        loaded = ckpt.load_checkpoint(run_dir / "best")
        metrics = evaluate(
            loaded.model, data, "test", ks=config.ks, exclude_history=config.exclude_history,
            batch_size=config.eval_batch_size,
            fixed_config_id=config.fixed_config_id(loaded.model.space),
        )
        metrics["checkpoint"] = str(run_dir / "best")
        write_metrics(metrics, run_dir / "metrics.json")
        shown = {k: round(v, 4) for k, v in metrics["metrics"].items() if k.endswith("@10")}
        print(f"test (best/): {json.dumps(shown)} -> {run_dir / 'metrics.json'}")
    return 0

