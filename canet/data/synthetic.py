"""Seeded synthetic interaction logs whose users differ in how hard their next item is to predict
(:func:`synthetic_log`; behaviour kinds :data:`SYNTHETIC_KINDS`), for demos and tests."""

from __future__ import annotations

import numpy as np

from canet.errors import ConfigError

from ._checks import check_count
from .readers import InteractionLog
from .split import MIN_EVAL_INTERACTIONS

__all__ = ["SYNTHETIC_KINDS", "synthetic_log"]

SYNTHETIC_KINDS = ("cycle", "markov", "second_order")


def synthetic_log(
    num_users: int,
    num_items: int,
    seed: int,
    seq_len: tuple[int, int] = (20, 60),
    kind_fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    num_clusters: int = 10,
    noise: float = 0.05,
) -> InteractionLog:
    """A seeded synthetic log whose users differ in how hard their next item is to predict.

    Each user gets one behaviour kind (drawn with ``kind_fractions``):

    * ``cycle`` (easy): repeats a private cycle of 2-4 random items; the last item alone
      determines the next, so a tiny model suffices.
    * ``markov`` (medium): items are split into ``num_clusters`` clusters; the next item's
      cluster follows a shared first-order transition table over clusters (each cluster has two
      likely successors), the item is uniform within that cluster.
    * ``second_order`` (hard): next item = ``perm[(prev + 3 * prev2) % num_items]`` for a shared
      random permutation ``perm``, i.e. depends on the last *two* items; the first-order
      statistics look nearly uniform.

    With probability ``noise`` any step is replaced by a uniform random item. Sequence lengths
    are uniform in ``seq_len`` (inclusive). Tokens are ``"u{index}"`` / ``"i{index}"``;
    timestamps increase within a user. ``log.meta["user_kind"]`` maps user token -> kind.
    """
    num_users = check_count("num_users", num_users, 1)
    num_items = check_count("num_items", num_items, 4)
    low, high = int(seq_len[0]), int(seq_len[1])
    # Every user gets a validation and a test target.
    if not MIN_EVAL_INTERACTIONS <= low <= high:
        raise ConfigError(
            f"seq_len must satisfy {MIN_EVAL_INTERACTIONS} <= low <= high, got {seq_len!r}"
        )
    fractions = np.asarray(kind_fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ConfigError(f"kind_fractions must be 3 non-negative weights, got {kind_fractions!r}")
    num_clusters = max(1, min(check_count("num_clusters", num_clusters, 1), num_items))
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"noise must be in [0, 1], got {noise!r}")

    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=num_users, p=fractions / fractions.sum())
    lengths = rng.integers(low, high + 1, size=num_users)
    cluster_of = rng.permutation(num_items) % num_clusters
    cluster_members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    successors = np.stack(
        [rng.choice(num_clusters, size=2, replace=num_clusters < 2) for _ in range(num_clusters)]
    )
    permutation = rng.permutation(num_items)

    sequences: list[np.ndarray] = []
    for user in range(num_users):
        length = int(lengths[user])
        kind = kinds[user]
        # Noise is drawn up front and applied inside the generators so that the Markov and
        # second-order rules continue from the noisy item, as a real user would.
        noisy = rng.random(length) < noise
        random_items = rng.integers(num_items, size=length)
        if kind == 0:
            cycle = rng.choice(num_items, size=int(rng.integers(2, 5)), replace=False)
            seq = np.resize(np.roll(cycle, -int(rng.integers(len(cycle)))), length)
            seq = np.where(noisy, random_items, seq).astype(np.int64)
        elif kind == 1:
            seq = np.empty(length, dtype=np.int64)
            picks = rng.random(length)
            cluster = int(rng.integers(num_clusters))
            for t in range(length):
                members = cluster_members[cluster]
                item = random_items[t] if noisy[t] else members[int(picks[t] * len(members))]
                seq[t] = item
                cluster = int(successors[cluster_of[item], 0 if picks[t] < 0.7 else 1])
        else:
            seq = random_items.astype(np.int64)  # the first two items are random
            for t in range(2, length):
                if not noisy[t]:
                    seq[t] = permutation[(seq[t - 1] + 3 * seq[t - 2]) % num_items]
        sequences.append(seq)

    flat_items = np.concatenate(sequences)
    user_index = np.repeat(np.arange(num_users), lengths)
    within = np.arange(len(flat_items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    user_tokens = np.array([f"u{u}" for u in range(num_users)], dtype=object)
    item_tokens = np.array([f"i{i}" for i in range(num_items)], dtype=object)
    kind_names = {f"u{u}": SYNTHETIC_KINDS[kinds[u]] for u in range(num_users)}
    return InteractionLog(
        users=user_tokens[user_index],
        items=item_tokens[flat_items],
        timestamps=(user_index * 1_000_000 + within).astype(np.float64),
        path="<synthetic>",
        format="synthetic",
        has_timestamps=True,
        meta={"user_kind": kind_names, "seed": seed},
    )
