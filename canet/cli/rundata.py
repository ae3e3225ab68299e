"""Is this log the one a run was trained on? One check for every command that reads a run and
a log (``canet evaluate``, ``canet pareto`` and its ``--against`` runs)."""

from __future__ import annotations

from ..checkpoint import Checkpoint, describe_data_change
from ..data import SequenceData
from ..errors import CanetError

__all__ = ["check_training_data"]


def check_training_data(
    loaded: Checkpoint,
    data: SequenceData,
    data_path: str,
    *,
    allow_different_data: bool | None = None,
    run: str = "the checkpoint",
    advice: str = "evaluate on the training data",
) -> str | None:
    """Refuse ``data`` (read from ``data_path`` with ``loaded``'s dataset options) unless it is
    the log ``loaded`` was trained on: the same vocabulary (users and items), and the same
    split (``trainer_state.json``'s data identity: same per-user sequences).

    A different split is refused too, unless ``allow_different_data`` is True; then its
    description is returned (None when the split is the same) for the caller to warn with.
    ``allow_different_data=False`` names the ``--allow-different-data`` option in the message;
    None means the command has no such option. ``run`` names the run in messages, ``advice``
    says what to do instead. CanetError, one line.
    """
    if data.vocab != loaded.vocab:
        raise CanetError(
            f"{data_path}: its users/items differ from {run}'s vocab.json "
            f"({data.num_items} vs {loaded.vocab.num_items} items); {advice}"
        )
    changed = describe_data_change(loaded.trainer_state.get("data"), data)
    if changed and not allow_different_data:
        option = ", or pass --allow-different-data" if allow_different_data is False else ""
        where = "" if run == "the checkpoint" else f" ({run})"
        raise CanetError(f"{data_path}: {changed}{where}; {advice}{option}")
    return changed
