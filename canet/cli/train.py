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
from .. import distributed
from ..config import TrainConfig, config_from_dict, load_config, read_yaml
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
    parser.add_argument(
        "--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="under torchrun: seconds a rank waits for the others at a collective before the "
             f"job stops (default {distributed.DEFAULT_TIMEOUT_S:g})",
    )
    parser.epilog = (
        "Any config key can be given as --key value or --key=value, e.g. --epochs 3 "
        "--fixed-config largest --lr=1e-3 (see docs/training.md)."
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """``canet train``: returns the exit status. Under torchrun (its environment variables
    set) each process is one rank of a distributed run (:func:`run_distributed`)."""
    env = distributed.environment()
    if env is not None:
        return run_distributed(args, extra, env)
    overrides = parse_config_overrides(extra)
    run_dir = _run_dir(args)
    if args.resume and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir / 'last'}: no checkpoint to resume from")
    with contextlib.ExitStack() as held:
        # The run directory's writer lock is held from here to metrics.json, so a second
        # `canet train` into it is refused before it loads the data (when the directory
        # already exists; a new one is created, and locked, only once config and data are good).
        if run_dir.is_dir():
            held.enter_context(ckpt.lock_run_dir(run_dir))
        config = _config(args, overrides, run_dir, clean_up=True)
        config.torch_device()  # an unavailable device fails before the data is read
        data = load_dataset(args.data, **config.dataset_options())
        held.enter_context(ckpt.lock_run_dir(run_dir))
        return _train_and_test(args, config, data, run_dir)


def _run_dir(args: argparse.Namespace) -> Path:
    """The run directory: --resume's, else --out's."""
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise CanetError(f"--out {args.out} differs from --resume {args.resume}")
        return run_dir
    if not args.out:
        raise CanetError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    return Path(args.out)


def _config(
    args: argparse.Namespace, overrides: dict, run_dir: Path, *, clean_up: bool
) -> TrainConfig:
    """The run's config: defaults < --config < overrides; on --resume, last/'s config <
    --config < overrides. ``clean_up``: first finish or undo an interrupted save there (the
    caller holds the run directory's lock); else (a rank other than 0 of a distributed run,
    while rank 0 may be cleaning up) read the checkpoint read-only, an interrupted save's
    ``.last.old-*`` included."""
    if not args.resume:
        return load_config(args.config, overrides)
    last = run_dir / "last"
    if clean_up:
        ckpt.cleanup_leftovers(run_dir)
    try:
        source = last if clean_up else ckpt.resolve_checkpoint_dir(last)
    except CheckpointError:
        source = last
    if not source.exists():
        raise CheckpointError(f"{last}: no checkpoint to resume from")
    config = ckpt.load_checkpoint(source).config
    if args.config:
        config = config_from_dict(read_yaml(args.config), config, source=args.config)
    if overrides:
        config = config_from_dict(overrides, config, source="command line")
    return config


def run_distributed(
    args: argparse.Namespace, extra: list[str], env: distributed.DistEnvironment
) -> int:
    """One rank of ``torchrun ... -m canet train``. Every rank resolves the same config and
    reads the data (each holds the log's item array and the small index arrays: any rank may
    draw any training window); rank 0 alone locks, writes and prints the run directory's files.
    An error in the config (before the process group exists) is printed by the first process
    of each machine; once the group exists, by the rank that has it (the others stop with it)."""
    main = env.rank == 0
    with contextlib.ExitStack() as held:
        try:
            run_dir = _run_dir(args)
            if main and run_dir.is_dir():
                # As in one process: the lock before anything in the directory is touched
                # (an interrupted save is cleaned up under it); held to metrics.json.
                held.enter_context(ckpt.lock_run_dir(run_dir))
            config = _config(args, parse_config_overrides(extra), run_dir, clean_up=main)
        except CanetError:
            if env.local_rank == 0:
                raise
            raise distributed.ReportedElsewhere("reported by LOCAL_RANK 0") from None
        return _run_group(args, config, run_dir, env, held)


def _run_group(
    args: argparse.Namespace, config: TrainConfig, run_dir: Path,
    env: distributed.DistEnvironment, held: contextlib.ExitStack,
) -> int:
    """The part of a distributed ``canet train`` that runs in the process group."""
    main = env.rank == 0
    group = distributed.start(env, config.torch_device(), args.dist_timeout)
    try:
        data = distributed.agreed(
            group, lambda: load_dataset(args.data, **config.dataset_options())
        )
        distributed.agreed(
            group, lambda: held.enter_context(ckpt.lock_run_dir(run_dir)) if main else None
        )
        status = _train_and_test(args, config, data, run_dir, group)
        # Every rank done before the group goes: rank 0 hosts the group's store, and a rank
        # still talking to it while it closes can abort at exit.
        group.barrier()
        return status
    except RuntimeError as error:
        peer = distributed.stopped_by_peer(error, env.rank)
        if peer is None:
            raise
        raise peer from None
    finally:
        group.close()


def _train_and_test(
    args: argparse.Namespace, config: TrainConfig, data, run_dir: Path,
    group: distributed.Group | None = None,
) -> int:
    main = group is None or group.is_main
    result = train(
        config, data, run_dir, resume=bool(args.resume), overwrite=args.overwrite, group=group
    )
    if not main:  # the test evaluation is sharded: this rank scores its share of the users
        if result.best_epoch is not None and not args.no_test:
            _test_metrics(config, data, run_dir, group)
        return 0
    print(
        f"done: {result.epochs_done} epochs, best valid ndcg@10 "
        f"{result.best_score if result.best_score is None else round(result.best_score, 4)} "
        f"at epoch {result.best_epoch}, skipped steps {result.skipped_steps}; training "
        f"{result.train_seconds:.1f}s, {result.targets_per_second:,.0f} targets/s"
    )
    if not args.no_test and result.best_epoch is not None:
        metrics = _test_metrics(config, data, run_dir, group)
        metrics["checkpoint"] = str(run_dir / "best")
        write_metrics(metrics, run_dir / "metrics.json")
        shown = {k: round(v, 4) for k, v in metrics["metrics"].items() if k.endswith("@10")}
        print(f"test (best/): {json.dumps(shown)} -> {run_dir / 'metrics.json'}")
    return 0



def _test_metrics(config: TrainConfig, data, run_dir: Path, group: distributed.Group | None):
    """Test metrics of RUN_DIR/best (every rank of a distributed run gets them all)."""
    model = ckpt.load_checkpoint(run_dir / "best").model
    if group is not None:
        model = model.to(group.device)
    return evaluate(
        model, data, "test", ks=config.ks,
        exclude_history=config.exclude_history, batch_size=config.eval_batch_size,
        fixed_config_id=config.fixed_config_id(model.space), group=group,
    )
