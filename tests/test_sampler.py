"""SequenceData.train_batches options for training throughput: ``length_buckets`` (the
"sortish" sampler) and ``trim`` (cut each batch to its longest real window); the plain order is
unchanged by them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from canet.data import InteractionLog, SequenceData, build_dataset
from canet.data.dataset import POOL_BATCHES


def geometric_log(
    num_users: int, seed: int, mean: float = 9.0, unique: bool = True
) -> InteractionLog:
    """Users with heavy-tailed history lengths: 2 + geometric, mean ``mean`` (min 3, so every
    user trains). ``unique``: every interaction gets its own item, so a window's last target
    identifies the window."""
    rng = np.random.default_rng(seed)
    lengths = 2 + rng.geometric(1.0 / (mean - 2.0), size=num_users)
    total = int(lengths.sum())
    users = np.repeat([f"u{u:06d}" for u in range(num_users)], lengths)
    item_ids = np.arange(total) if unique else rng.integers(0, max(4, total // 11), size=total)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return InteractionLog(
        users=users.astype(object),
        items=np.array([f"i{i:07d}" for i in item_ids], dtype=object),
        timestamps=(np.arange(total) - first).astype(np.float64),
        path="<geometric>",
        format="test",
    )


def batches(data: SequenceData, batch_size: int, seed: int | None = 0, **options):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    shuffle = options.pop("shuffle", seed is not None)
    return list(data.train_batches(batch_size, generator, shuffle=shuffle, **options))


def window_keys(found) -> Counter:
    """Multiset of whole (input row, target row) windows, left-padded to a common width."""
    width = max((s.shape[1] for s, _ in found), default=0)
    keys: Counter = Counter()
    for seqs, targets in found:
        pad = (width - seqs.shape[1], 0)
        seqs, targets = torch.nn.functional.pad(seqs, pad), torch.nn.functional.pad(targets, pad)
        keys.update(zip(map(tuple, seqs.tolist()), map(tuple, targets.tolist()), strict=True))
    return keys


@pytest.fixture(scope="module")
def small() -> SequenceData:
    # max_len 8 with mean length 9: many users have 2+ windows, the oldest one short.
    return build_dataset(geometric_log(400, seed=1), max_len=8)


# --------------------------------------------------------------------------------------------
# Plain mode
# --------------------------------------------------------------------------------------------


def old_train_batches(data: SequenceData, batch_size, generator, shuffle, drop_last):
    """train_batches as of bbfbe72 (before length_buckets/trim), for comparison."""
    count = len(data.sample_users)
    order = torch.randperm(count, generator=generator).numpy() if shuffle else np.arange(count)
    stop = count - count % batch_size if drop_last else count
    for first in range(0, stop, batch_size):
        chosen = order[first : first + batch_size]
        users, ends = data.sample_users[chosen], data.sample_ends[chosen]
        starts = data.starts[users]
        length = data.max_len
        pos = ends[:, None] - 1 - length + np.arange(length)[None, :]
        seqs = np.where(pos >= starts[:, None], data.items[np.maximum(pos, 0)], 0)
        pos = pos + 1
        targets = np.where(pos >= starts[:, None] + 1, data.items[np.maximum(pos, 0)], 0)
        yield torch.from_numpy(seqs), torch.from_numpy(targets)


@pytest.mark.parametrize(("batch_size", "shuffle", "drop_last"), [
    (16, True, False), (16, True, True), (7, False, False), (1000, True, False),
])
def test_plain_mode_is_unchanged(small: SequenceData, batch_size, shuffle, drop_last) -> None:
    new_gen, old_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    new = list(small.train_batches(batch_size, new_gen, shuffle, drop_last))
    old = list(old_train_batches(small, batch_size, old_gen, shuffle, drop_last))
    assert len(new) == len(old) == small.num_train_batches(batch_size, drop_last)
    for (s_new, t_new), (s_old, t_old) in zip(new, old, strict=True):
        assert torch.equal(s_new, s_old) and torch.equal(t_new, t_old)
    # Same RNG use, so a resumed run continues with the same generator state.
    assert torch.equal(new_gen.get_state(), old_gen.get_state())


def test_sample_lengths_count_real_positions(small: SequenceData) -> None:
    seqs, targets = batches(small, 10**6, seed=None)[0]  # every window, sample order
    assert seqs.shape[0] == len(small.sample_lengths)
    assert ((seqs != 0).sum(1).numpy() == small.sample_lengths).all()
    assert ((targets != 0).sum(1).numpy() == small.sample_lengths).all()
    assert small.sample_lengths.min() >= 1 and small.sample_lengths.max() == small.max_len


# --------------------------------------------------------------------------------------------
# Length buckets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 16, 64, 10**5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_buckets_yield_every_window_once(small: SequenceData, batch_size, drop_last) -> None:
    count = len(small.sample_users)
    plain = batches(small, batch_size)
    bucketed = batches(small, batch_size, length_buckets=True, drop_last=drop_last)
    assert len(bucketed) == small.num_train_batches(batch_size, drop_last)
    sizes = [s.shape[0] for s, _ in bucketed]
    # All batches full except at most one short one, and none with drop_last.
    assert sum(size != batch_size for size in sizes) == (count % batch_size != 0 and not drop_last)
    assert all(0 < size <= batch_size for size in sizes)
    keys = window_keys(bucketed)
    assert max(keys.values(), default=1) == 1  # unique items: no window twice
    if drop_last:
        assert sum(sizes) == count - count % batch_size and keys.keys() <= window_keys(plain).keys()
    else:
        assert keys == window_keys(plain)


def test_bucket_order_depends_only_on_seed(small: SequenceData) -> None:
    def rows(seed):
        return [torch.cat([s, t], 1) for s, t in batches(small, 16, seed, length_buckets=True)]

    first, again, other = rows(3), rows(3), rows(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # The batch order is shuffled too: the batches are not sorted by length across the epoch.
    longest = [int((s != 0).sum(1).max()) for s in first]
    assert longest != sorted(longest)


def test_buckets_sort_within_pools(small: SequenceData) -> None:
    # shuffle=False: identity permutations, so the yielded windows are the pools in order,
    # each sorted by length, ties in sample order.
    batch_size = 2
    found = batches(small, batch_size, seed=None, length_buckets=True)
    lengths = np.concatenate([(s != 0).sum(1).numpy() for s, _ in found])
    pool = POOL_BATCHES * batch_size
    full = len(lengths) - len(lengths) % batch_size
    assert len(small.sample_users) > pool  # several pools
    for first in range(0, full, pool):
        chunk = small.sample_lengths[first : min(first + pool, full)]
        assert (lengths[first : first + len(chunk)] == np.sort(chunk, kind="stable")).all()


def padded_area(data: SequenceData, batch_size: int, **options) -> int:
    return sum(s.numel() for s, _ in batches(data, batch_size, trim=True, **options))


def test_buckets_reduce_padding() -> None:
    # Amazon-Video-Games-like: mean history 9, max_len 50, a geometric tail past max_len.
    data = build_dataset(geometric_log(8000, seed=2, unique=False), max_len=50)
    assert data.sample_lengths.max() == 50
    real = int(data.sample_lengths.sum())
    full = len(data.sample_users) * data.max_len
    plain = padded_area(data, 64)
    bucketed = padded_area(data, 64, length_buckets=True)
    print(f"real {real}, untrimmed {full}, trimmed {plain}, trimmed+buckets {bucketed}")
    assert real <= bucketed < 0.6 * plain <= 0.6 * full
    # Measured: real 47,070; untrimmed 344,300 (14% real); trimmed 206,454;
    # trimmed + buckets 53,494 (0.26x of trimmed, 88% real).


# --------------------------------------------------------------------------------------------
# Trim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length_buckets", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_trim_keeps_the_last_columns(small: SequenceData, length_buckets, batch_size) -> None:
    full = batches(small, batch_size, length_buckets=length_buckets)
    cut = batches(small, batch_size, length_buckets=length_buckets, trim=True)
    assert len(full) == len(cut)
    widths = set()
    for (seqs, targets), (s_cut, t_cut) in zip(full, cut, strict=True):
        width = s_cut.shape[1]
        widths.add(width)
        assert t_cut.shape == s_cut.shape == (seqs.shape[0], width)
        assert torch.equal(s_cut, seqs[:, -width:]) and torch.equal(t_cut, targets[:, -width:])
        # The columns cut are padding in both tensors, and the width is the longest real row.
        assert not seqs[:, :-width].any() and not targets[:, :-width].any()
        assert width == int((seqs != 0).sum(1).max()) == int((targets != 0).sum(1).max())
    # The test exercises several widths (random batches of 64 all hold a full window).
    assert len(widths) > 1 or (batch_size == 64 and not length_buckets)
    if batch_size == 1:  # one window per batch: no padding left at all
        assert all(bool((s != 0).all()) for s, _ in cut)


def test_trim_windows_of_length_one() -> None:
    # Every user has 4 interactions: a training prefix of 2, so one window with one target.
    rows = [(f"u{u}", f"i{u}_{t}", float(t)) for u in range(5) for t in range(4)]
    log = InteractionLog(
        users=np.array([r[0] for r in rows], dtype=object),
        items=np.array([r[1] for r in rows], dtype=object),
        timestamps=np.array([r[2] for r in rows]),
        path="<test>",
        format="test",
    )
    data = build_dataset(log, max_len=6)
    assert (data.sample_lengths == 1).all()
    (seqs, targets), = batches(data, 8, trim=True, length_buckets=True)
    assert seqs.shape == (5, 1) and (seqs != 0).all() and (targets != 0).all()
    (full_seqs, full_targets), = batches(data, 8, length_buckets=True)
    assert torch.equal(full_seqs[:, -1:], seqs) and torch.equal(full_targets[:, -1:], targets)


def test_trim_with_max_len_one() -> None:
    data = build_dataset(geometric_log(50, seed=3), max_len=1)
    assert (data.sample_lengths == 1).all()
    full = batches(data, 8, length_buckets=True)
    cut = batches(data, 8, length_buckets=True, trim=True)
    assert all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(full, cut, strict=True)
    )
    assert all(s.shape[1] == 1 for s, _ in cut)
