"""Options and checks shared by several commands: serve-time budgets and the data of a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..budget import check_budget, distinct_budgets
from ..checkpoint import Checkpoint, describe_data_change
from ..data import SequenceData, load_dataset
from ..errors import CanetError

__all__ = [
    "add_budget_arguments",
    "budget_options",
    "describe_budget",
    "load_run_data",
    "output_dir",
    "parse_budget_list",
]


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--budget B`` and ``--max-flops F`` (parsed as text, checked by :func:`budget_options`
    so that every bad value is the same one-line error)."""
    parser.add_argument(
        "--budget", metavar="B",
        help="serve-time compute budget in (0, 1]: the mean FLOPs per user, as a fraction of the "
        "largest sub-network's, through the run's calibration table (canet calibrate); 1 = the "
        "router's own routing",
    )
    parser.add_argument(
        "--max-flops", metavar="F",
        help="hard per-user cap in (0, 1]: no user runs a sub-network above this fraction of "
        "the largest one's FLOPs (needs no calibration)",
    )


def budget_options(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """(budget, max_flops) of :func:`add_budget_arguments`' options, checked (BudgetError)."""
    budget = None if args.budget is None else check_budget(args.budget, "--budget")
    max_flops = None if args.max_flops is None else check_budget(args.max_flops, "--max-flops")
    return budget, max_flops


def describe_budget(budget: float | None, max_flops: float | None) -> str:
    """``"budget 0.3, max-flops 0.5"`` (the options given) for the commands' output."""
    return ", ".join(f"{label} {value:g}" for label, value in
                     (("budget", budget), ("max-flops", max_flops)) if value is not None)


def parse_budget_list(text: str, option: str = "--budgets") -> list[float]:
    """``"0.1,0.2,0.5"`` -> [0.1, 0.2, 0.5]; every entry a number in (0, 1], none twice
    (BudgetError)."""
    return distinct_budgets([part.strip() for part in text.split(",")],
                            entry=f"each {option} entry")


def load_run_data(
    path: str, loaded: Checkpoint, verb: str, allow_different: bool | None = None
) -> SequenceData:
    """The log at ``path`` read with the run's data options, refused (CanetError) unless its
    users and items are the run's (vocab.json) and its split is the one the run was trained
    on. ``allow_different``: the command's ``--allow-different-data`` (True: another split is
    only warned about on stderr; None: the command has no such option). ``verb`` says what the
    command does with the data ("evaluate", "calibrate")."""
    data = load_dataset(path, **loaded.config.dataset_options())
    if data.vocab != loaded.vocab:
        raise CanetError(
            f"{path}: its users/items differ from the checkpoint's vocab.json "
            f"({data.num_items} vs {loaded.vocab.num_items} items); {verb} on the training data"
        )
    changed = describe_data_change(loaded.trainer_state.get("data"), data)
    if changed and not allow_different:
        hint = "" if allow_different is None else ", or pass --allow-different-data"
        raise CanetError(f"{path}: {changed}; {verb} on the training data{hint}")
    if changed:
        print(f"canet: warning: {path}: {changed}; these metrics are of another split",
              file=sys.stderr)
    return data


def output_dir(run_dir: str, loaded: Checkpoint) -> Path:
    """Where a command writes its default output for the ``run_dir`` argument: the run
    directory itself, also when a run's ``best/`` or ``last/`` was named (a checkpoint
    directory holds its listed files only: the next save or calibration rebuilds it without
    anything else), else the standalone checkpoint directory that was loaded."""
    path = Path(run_dir)
    if (path / "best").exists() or (path / "last").exists():
        return path
    if loaded.path.name in ("best", "last") and (loaded.path.parent / "config.yaml").exists():
        return loaded.path.parent
    return loaded.path
