"""The data layer: interaction logs in, batches of left-padded item-id sequences out.

Pipeline::

    data = load_dataset("ml-100k.inter", max_len=50)     # read, filter, remap ids, split
    # or: log = read_interactions(path); data = build_dataset(log, max_len=50)
    for seqs, targets in data.train_batches(256, generator):   # [B, L] int64 each
        ...
    for users, seqs, targets in data.eval_batches("test", 512):
        ...

Modules:

* :mod:`canet.data.readers`: :class:`InteractionLog`, :data:`FORMATS` (the supported file
  formats), :func:`detect_format`, :func:`read_interactions`.
* :mod:`canet.data.vocab`: :class:`Vocab`, external tokens <-> internal ids.
* :mod:`canet.data.split`: the leave-one-out rule (:data:`MIN_EVAL_INTERACTIONS`,
  :func:`split_ends`).
* :mod:`canet.data.dataset`: :class:`SequenceData` (splits, training windows, batches),
  :func:`build_dataset`, :func:`load_dataset`.
* :mod:`canet.data.synthetic`: :func:`synthetic_log`, :data:`SYNTHETIC_KINDS`.

Conventions used everywhere in canet:

* Item ids are ``1..num_items``; ``0`` is padding. User ids are ``0..num_users-1``.
* Sequences are left-padded: the most recent item is at position ``L-1``.
* Leave-one-out: per user (sorted by timestamp, ties kept in file order) the last item is the
  test target, the second-to-last the validation target, the rest the training prefix
  (:mod:`canet.data.split`).

This package imports only canet's core modules (``canet.errors``), never the training layer.
"""

from __future__ import annotations

from .dataset import SequenceData, build_dataset, load_dataset
from .readers import FORMATS, InteractionLog, detect_format, read_interactions
from .split import MIN_EVAL_INTERACTIONS, SplitEnds, split_ends
from .synthetic import SYNTHETIC_KINDS, synthetic_log
from .vocab import Vocab

__all__ = [
    "FORMATS",
    "MIN_EVAL_INTERACTIONS",
    "SYNTHETIC_KINDS",
    "InteractionLog",
    "SequenceData",
    "SplitEnds",
    "Vocab",
    "build_dataset",
    "detect_format",
    "load_dataset",
    "read_interactions",
    "split_ends",
    "synthetic_log",
]
