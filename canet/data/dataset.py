"""Datasets: a log filtered, remapped and split (:func:`build_dataset`, :func:`load_dataset`)
into :class:`SequenceData`, which batches training windows and evaluation inputs.

Sequences are left-padded: the most recent item is at position ``L-1``; ``0`` is padding.
The split is the leave-one-out rule of :mod:`canet.data.split`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from canet.errors import DataFormatError

from ._checks import check_count
from .readers import InteractionLog, read_interactions
from .split import MIN_EVAL_INTERACTIONS, SPLITS, split_ends
from .vocab import Vocab

__all__ = ["POOL_BATCHES", "SequenceData", "build_dataset", "load_dataset"]

# Length buckets (``train_batches(length_buckets=True)``): windows are sorted by length within
# pools of POOL_BATCHES batches of a random permutation (fastai's "sortish" sampler uses the same
# 50). Larger pools group lengths more tightly (less padding) but make a batch's windows less
# random; with 50, a batch covers about 1/50 of the pool's length quantiles (on an Amazon-like
# log, ~90% of a trimmed batch is real items), while each pool is still a fresh random draw.
POOL_BATCHES = 50


class SequenceData:
    """Per-user item sequences with a leave-one-out split and SASRec-style training windows.

    Storage: one flat int64 array ``items`` (ids 1..N, users contiguous, each user's items in
    time order) and ``offsets`` [U + 1]; user ``u`` owns ``items[offsets[u]:offsets[u + 1]]``.
    Training samples are ``(user, end)`` index pairs; windows are gathered when batching.

    Split: :func:`canet.data.split.split_ends` of the per-user lengths (test target
    ``seq[n-1]``, validation target ``seq[n-2]``, training prefix ``seq[:n-2]``; users with
    fewer than ``MIN_EVAL_INTERACTIONS`` items only train), kept as ``split_ends``.

    Training windows over a prefix of length P >= 2: the first window ends at the prefix end
    (targets = the last ``min(L, P-1)`` prefix items, inputs = the item before each target);
    each further window ends ``L`` items earlier, until no target with an input is left. So each
    prefix item except the first is a target exactly once. ``sample_lengths`` (int64 [S], each
    in ``1..L``) is each window's number of real (non-padding) positions.
    """

    def __init__(
        self,
        items: np.ndarray,
        offsets: np.ndarray,
        vocab: Vocab,
        max_len: int,
        path: str = "<memory>",
        stats: Mapping[str, int] | None = None,
    ) -> None:
        self.items = np.ascontiguousarray(items, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.vocab = vocab
        self.max_len = int(max_len)
        self.path = path
        self.num_users = vocab.num_users
        self.num_items = vocab.num_items
        if len(self.offsets) != self.num_users + 1 or self.offsets[-1] != len(self.items):
            raise ValueError("offsets do not match the vocabulary / item array")
        self.starts = self.offsets[:-1]
        self.lengths = np.diff(self.offsets)
        self.split_ends = split_ends(self.lengths)
        self._eval_users = np.flatnonzero(self.split_ends.has_eval).astype(np.int64)
        self.train_lengths = self.split_ends.train
        # Where each user's input history ends, per split, relative to the user's start.
        self._history_ends = {
            name: self.split_ends.history_end(name) for name in ("train", *SPLITS)
        }
        self.sample_users, self.sample_ends = self._training_samples()
        # Real (non-padding) positions of each training window: its targets are the flat
        # positions [end - L, end) clipped to >= start + 1.
        self.sample_lengths = np.minimum(
            self.max_len, self.sample_ends - self.starts[self.sample_users] - 1
        )
        self.stats: dict[str, int] = {
            "num_interactions": len(self.items),
            "num_users": int(self.num_users),
            "num_items": int(self.num_items),
            "num_eval_users": len(self._eval_users),
            "num_train_only_users": int(self.num_users - len(self._eval_users)),
            "num_train_samples": len(self.sample_users),
        }
        if stats:
            self.stats.update({key: int(value) for key, value in stats.items()})

    def _training_samples(self) -> tuple[np.ndarray, np.ndarray]:
        prefix = self.train_lengths
        # Windows needed to cover the P - 1 targets of a prefix, L targets per window.
        windows = np.where(prefix >= 2, (prefix - 1 + self.max_len - 1) // self.max_len, 0)
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), windows)
        first = np.cumsum(windows) - windows  # index of each user's first window
        window_rank = np.arange(len(users), dtype=np.int64) - np.repeat(first, windows)
        ends = self.starts[users] + prefix[users] - window_rank * self.max_len
        return users, ends

    # -- access -----------------------------------------------------------------------------

    def user_sequence(self, user: int) -> np.ndarray:
        """All items of ``user`` in time order (a view, int64 [n])."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def eval_users(self, split: str) -> np.ndarray:
        """Users (int64 [k], ascending) that have a ``split`` target, i.e. at least
        ``MIN_EVAL_INTERACTIONS`` interactions."""
        self._check_split(split)
        return self._eval_users

    def history(self, split: str, user: int) -> np.ndarray:
        """The full input history of ``user`` for ``split`` ("train"/"valid": the training
        prefix; "test": prefix + validation item), not truncated to ``max_len``."""
        if split not in ("train", *SPLITS):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        start = self.offsets[user]
        return self.items[start : start + self._history_ends[split][user]]

    def history_pairs(self, split: str, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) index pairs of the full input histories of ``users`` [B] for ``split``,
        for excluding already-seen items beyond the ``max_len`` window from a [B, N+1] score
        matrix (see ``canet.metrics.exclude_pairs``). Returns two int64 tensors [K]."""
        self._check_split(split)
        user_list = users.detach().cpu().reshape(-1).tolist()
        parts = [self.history(split, user) for user in user_list]
        rows = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        cols = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))

    # -- batching ---------------------------------------------------------------------------

    def _windows(
        self, ends: np.ndarray, starts: np.ndarray, width: int | None = None
    ) -> np.ndarray:
        """Items at flat positions ``[end - width, end)`` clipped to ``>= start``, left-padded.

        ends, starts: int64 [B]; ``width`` defaults to L. Returns int64 [B, width]; the last
        column holds position end - 1, so a width-W window is the last W columns of the L one.
        """
        width = self.max_len if width is None else width
        positions = ends[:, None] - width + np.arange(width, dtype=np.int64)[None, :]
        inside = positions >= starts[:, None]
        gathered = self.items[np.where(inside, positions, 0)]
        return np.where(inside, gathered, 0)

    def num_train_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per epoch of :meth:`train_batches` (the same with or without its
        ``length_buckets`` and ``trim``)."""
        count = len(self.sample_users)
        return count // batch_size if drop_last else -(-count // batch_size)

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        *,
        length_buckets: bool = False,
        trim: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(seqs [B, W] int64, targets [B, W] int64)``; ``targets[b, j]`` is the item
        following ``seqs[b, j]``; both are 0 at padding positions. Every training window is in
        exactly one batch per epoch; batches hold ``batch_size`` windows except at most one
        short batch, which ``drop_last`` drops.

        Order: without ``length_buckets``, a permutation drawn from ``generator`` (the global
        torch RNG if None) when ``shuffle``, else sample order, cut into consecutive batches
        (the short batch last). With ``length_buckets`` ("sortish" batching, so a log of short
        histories runs short batches once trimmed): the permutation's first
        ``count - count % batch_size`` windows are cut into pools of ``POOL_BATCHES *
        batch_size``; each pool is stably sorted by window length (ties keep the random order)
        and cut into batches; the remaining ``count % batch_size`` random windows form the short
        batch; then the order of all batches is shuffled by a second permutation from the same
        ``generator``. The order depends only on the generator's state. With ``shuffle=False``
        both permutations are the identity (pools sorted, batches in pool order).

        ``trim``: W = the longest window in the batch (``max(sample_lengths)``, 1..L) instead
        of L = max_len. The columns kept are the LAST W columns of the max_len window (the ones
        cut are padding in both tensors), so column ``j`` of a trimmed batch is position
        ``L - W + j`` of the full window: a model adding ``pos_emb[L - W:]`` (a right-aligned
        position embedding) computes for every sample what it computes on the full window.
        Without ``trim``, W = L.
        """
        batches = self.train_batch_indices(
            batch_size, generator, shuffle, drop_last, length_buckets=length_buckets
        )
        for chosen in batches:
            yield self.train_windows(chosen, trim=trim)

    def train_batch_indices(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        *,
        length_buckets: bool = False,
    ) -> Iterator[np.ndarray]:
        """The batches of :meth:`train_batches` as int64 arrays of training-window indices
        (into ``sample_users``/``sample_ends``/``sample_lengths``), in the same order and from
        the same draws of ``generator``. A distributed run splits each of them across ranks."""
        _check_batch_size(batch_size)
        count = len(self.sample_users)
        if shuffle:
            order = torch.randperm(count, generator=generator).numpy()
        else:
            order = np.arange(count)
        if length_buckets:
            yield from self._bucketed_batches(order, batch_size, generator, shuffle, drop_last)
        else:
            stop = count - count % batch_size if drop_last else count
            for first in range(0, stop, batch_size):
                yield order[first : first + batch_size]

    def train_windows(
        self, chosen: np.ndarray, *, trim: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seqs [B, W], targets [B, W])`` int64 of the training windows ``chosen`` (int64
        ``[B]``, B >= 1, indices as :meth:`train_batch_indices` yields): see
        :meth:`train_batches` for W and ``trim``."""
        users, ends = self.sample_users[chosen], self.sample_ends[chosen]
        starts = self.starts[users]
        width = max(1, int(self.sample_lengths[chosen].max())) if trim else self.max_len
        seqs = self._windows(ends - 1, starts, width)
        targets = self._windows(ends, starts + 1, width)
        return torch.from_numpy(seqs), torch.from_numpy(targets)

    def _bucketed_batches(
        self,
        order: np.ndarray,
        batch_size: int,
        generator: torch.Generator | None,
        shuffle: bool,
        drop_last: bool,
    ) -> list[np.ndarray]:
        """The "sortish" batches of :meth:`train_batches` from the permutation ``order`` [S]:
        a list of int64 sample-index arrays, in the order to yield them."""
        full = len(order) - len(order) % batch_size
        body = order[:full]
        # Pools are a multiple of batch_size long, so only the remainder makes a short batch;
        # taking the remainder from the random order (not from a sorted pool) keeps drop_last
        # dropping a uniformly random set of windows, as without buckets.
        pool = np.arange(full, dtype=np.int64) // (POOL_BATCHES * batch_size)
        body = body[np.lexsort((self.sample_lengths[body], pool))]  # stable: ties keep order
        batches = list(body.reshape(-1, batch_size))
        if full < len(order) and not drop_last:
            batches.append(order[full:])
        if shuffle:
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[index] for index in batch_order]
        return batches

    def eval_batches(
        self, split: str, batch_size: int, part: slice | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(users [B] int64, seqs [B, L] int64, targets [B] int64)`` for every user
        with a ``split`` target, in ascending user order (``part``: only the users
        ``eval_users(split)[part]``, e.g. one rank's share). ``seqs`` is the last L items of the
        split's input history, left-padded."""
        self._check_split(split)
        _check_batch_size(batch_size)
        users_all = self._eval_users if part is None else self._eval_users[part]
        for first in range(0, len(users_all), batch_size):
            users = users_all[first : first + batch_size]
            starts = self.starts[users]
            # The input ends where the target is: flat positions of the targets.
            input_ends = starts + self._history_ends[split][users]
            seqs = self._windows(input_ends, starts)
            targets = self.items[input_ends]
            yield torch.from_numpy(users.copy()), torch.from_numpy(seqs), torch.from_numpy(targets)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def __repr__(self) -> str:
        return (
            f"SequenceData(users={self.num_users}, items={self.num_items}, "
            f"interactions={len(self.items)}, max_len={self.max_len}, path={self.path!r})"
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")



def _factorize(tokens: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes int64 [n] into the sorted list of distinct tokens."""
    distinct = sorted(set(tokens.tolist()))
    index = {token: code for code, token in enumerate(distinct)}
    codes = np.fromiter(
        (index[token] for token in tokens.tolist()), dtype=np.int64, count=len(tokens)
    )
    return codes, distinct


def build_dataset(
    log: InteractionLog, max_len: int, min_user_inter: int = 0, min_item_inter: int = 0
) -> SequenceData:
    """Filter, remap and split an interaction log.

    Filters (RecBole-style "k-core"): users with fewer than ``min_user_inter`` and items with
    fewer than ``min_item_inter`` interactions are removed, repeatedly until no more rows are
    removed (removing an item can push a user below the threshold and vice versa).

    Ids: users 0..U-1 and items 1..N in sorted order of their token strings (independent of row
    order). Each user's items are stably sorted by timestamp: ties keep file order.

    Raises:
        ConfigError: bad ``max_len``/threshold values.
        DataFormatError: (``log.path``, no line) when no user has ``MIN_EVAL_INTERACTIONS``
            interactions left, or no user a training window (a training prefix of 2+ items:
            every user has fewer than ``MIN_EVAL_INTERACTIONS + 1`` interactions).
    """
    max_len = check_count("max_len", max_len, 1)
    min_user_inter = check_count("min_user_inter", min_user_inter, 0)
    min_item_inter = check_count("min_item_inter", min_item_inter, 0)
    user_codes, user_tokens = _factorize(np.asarray(log.users, dtype=object))
    item_codes, item_tokens = _factorize(np.asarray(log.items, dtype=object))
    timestamps = np.asarray(log.timestamps, dtype=np.float64)

    keep = np.ones(len(user_codes), dtype=bool)
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=len(user_tokens))
        item_counts = np.bincount(item_codes[keep], minlength=len(item_tokens))
        new_keep = (
            keep
            & (user_counts[user_codes] >= min_user_inter)
            & (item_counts[item_codes] >= min_item_inter)
        )
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep

    rows = np.flatnonzero(keep)
    kept_users = np.unique(user_codes[rows])
    kept_items = np.unique(item_codes[rows])
    # Compress codes to dense ids while keeping the sorted-token order.
    user_ids = np.searchsorted(kept_users, user_codes[rows])
    item_ids = np.searchsorted(kept_items, item_codes[rows]) + 1
    order = np.lexsort((rows, timestamps[rows], user_ids))  # last key is the primary one

    vocab = Vocab([user_tokens[c] for c in kept_users], [item_tokens[c] for c in kept_items])
    counts = np.bincount(user_ids, minlength=vocab.num_users)
    if not np.any(split_ends(counts).has_eval):
        raise DataFormatError(
            log.path,
            None,
            f"no user has at least {MIN_EVAL_INTERACTIONS} interactions after filtering "
            f"(min_user_inter="
            f"{min_user_inter}, min_item_inter={min_item_inter}; {len(rows)} of {len(log)} rows "
            "kept); leave-one-out needs a training item, a validation and a test target",
        )
    if not np.any(split_ends(counts).train >= 2):
        # A training window needs an input and a target in the training prefix (everything
        # before the validation and test targets): without one, training would take no step
        # and save an untrained model as if it had trained.
        raise DataFormatError(
            log.path,
            None,
            f"no training windows: every user has fewer than {MIN_EVAL_INTERACTIONS + 1} "
            f"interactions after filtering (min_user_inter={min_user_inter}, "
            f"min_item_inter={min_item_inter}; {len(rows)} of {len(log)} rows kept); a user "
            f"needs {MIN_EVAL_INTERACTIONS + 1}+ to train on (input and target) besides the "
            "validation and test targets",
        )
    offsets = np.zeros(vocab.num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SequenceData(
        items=item_ids[order].astype(np.int64),
        offsets=offsets,
        vocab=vocab,
        max_len=max_len,
        path=log.path,
        stats={"num_filtered_interactions": int(len(log) - len(rows))},
    )



def load_dataset(
    path: str | os.PathLike[str],
    *,
    max_len: int,
    format: str | None = None,
    column_map: Mapping[str, str] | None = None,
    min_user_inter: int = 0,
    min_item_inter: int = 0,
) -> SequenceData:
    """Read the interaction log at ``path`` and build its dataset: :func:`read_interactions`
    (``format``, ``column_map``) then :func:`build_dataset` (``max_len``, the filters).

    Raises what those raise: DataFormatError for the file, ConfigError for the arguments.
    """
    log = read_interactions(path, format=format, column_map=column_map)
    return build_dataset(
        log, max_len, min_user_inter=min_user_inter, min_item_inter=min_item_inter
    )
