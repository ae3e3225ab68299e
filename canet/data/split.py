"""The leave-one-out split, stated once: which items of a user are training, validation, test.

Protocol: per user, items sorted by timestamp (ties kept in file order), ``n`` interactions:

* ``n >= MIN_EVAL_INTERACTIONS`` (3): the last item ``seq[n-1]`` is the test target (input
  ``seq[:n-1]``), the second to last ``seq[n-2]`` the validation target (input ``seq[:n-2]``),
  and ``seq[:n-2]`` the training prefix (at least one item).
* ``n < MIN_EVAL_INTERACTIONS``: every item is training; the user has no validation or test
  target and is not evaluated.

A target's position is also where its input history ends: the input of a split is every item
of the user before its target (the model sees the last ``max_len`` of them).
:func:`split_ends` gives these positions for every user at once; :class:`canet.data.SequenceData`
and :func:`canet.data.build_dataset` apply the rule only through it and the constant.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MIN_EVAL_INTERACTIONS", "NO_TARGET", "SPLITS", "SplitEnds", "split_ends"]

# A user needs a training item, a validation target and a test target to be evaluated.
MIN_EVAL_INTERACTIONS = 3

# The evaluation splits, each with one target per evaluated user.
SPLITS = ("valid", "test")

# Target position of a user without a validation/test target.
NO_TARGET = -1


class SplitEnds(NamedTuple):
    """Per-user positions of the leave-one-out split, each int64 ``[U]``, counted from the
    start of the user's time-ordered sequence.

    Attributes:
        train: length of the training prefix ``seq[:train]`` (``n`` for a user without
            targets, ``n - 2`` otherwise).
        valid: position of the validation target (its input is ``seq[:valid]``), or
            :data:`NO_TARGET`.
        test: position of the test target (its input is ``seq[:test]``), or :data:`NO_TARGET`.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def has_eval(self) -> np.ndarray:
        """bool ``[U]``: the user has a validation and a test target."""
        return self.test != NO_TARGET

    def history_end(self, split: str) -> np.ndarray:
        """int64 ``[U]``: where each user's input history for ``split`` ends.

        ``"valid"``/``"test"``: the split's target position (the items before the target);
        ``"train"``, and users without targets in any split: the training prefix's end.
        """
        if split == "train":
            return self.train
        if split not in SPLITS:
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        target = self.valid if split == "valid" else self.test
        return np.where(target != NO_TARGET, target, self.train)


def split_ends(lengths: np.ndarray) -> SplitEnds:
    """The leave-one-out split of users with ``lengths`` interactions (int ``[U]``, >= 0).

    Example: lengths ``[0, 1, 2, 3, 4, 10]`` give ``train = [0, 1, 2, 1, 2, 8]``,
    ``valid = [-1, -1, -1, 1, 2, 8]`` and ``test = [-1, -1, -1, 2, 3, 9]``.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not (lengths.size == 0 or np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(
            f"lengths must be a 1-D integer array [U], got dtype {lengths.dtype} and shape "
            f"{lengths.shape}"
        )
    lengths = lengths.astype(np.int64)
    if np.any(lengths < 0):
        raise ValueError(f"lengths must be >= 0, got minimum {int(lengths.min())}")
    has_eval = lengths >= MIN_EVAL_INTERACTIONS
    # The last item is the test target, the one before it the validation target.
    test = np.where(has_eval, lengths - 1, NO_TARGET)
    valid = np.where(has_eval, test - 1, NO_TARGET)
    train = np.where(has_eval, valid, lengths)
    return SplitEnds(train=train, valid=valid, test=test)
