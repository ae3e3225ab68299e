"""Full-ranking leave-one-out metrics: one target per user, ranked against every item.

Score matrices are ``[B, N + 1]``: column ``i`` is item id ``i``; column 0 (padding) is never
a candidate. Typical use::

    accumulator = MetricAccumulator(ks=(5, 10, 20))
    for users, seqs, targets in data.eval_batches("test", 512):
        scores = exclude_history(model(seqs), seqs)
        accumulator.add(target_ranks(scores, targets))
    results = accumulator.compute()   # {"recall@10": ..., "ndcg@10": ..., "num_users": ...}

Choices, following the CANet/SASRec evaluation code:

* History exclusion removes every item of the input sequence, even when the target repeats
  one of them; such a target gets score -inf and therefore the worst rank N (a miss).
* Ties: the rank of the target is the number of items with a *strictly* greater score, i.e.
  ties are resolved in the target's favour (optimistic). Models with continuous scores
  essentially never tie; a constant model would score a perfect rank 0 -- be aware.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "METRIC_NAMES",
    "MetricAccumulator",
    "exclude_history",
    "exclude_pairs",
    "paired_difference",
    "rank_metric_sums",
    "rank_metric_values",
    "rank_metrics",
    "target_ranks",
]

METRIC_NAMES = ("recall", "hit", "ndcg", "mrr")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] < 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [B, N + 1] tensor with N >= 1, got {shape}")
    if not torch.is_floating_point(scores):
        raise ValueError(f"scores must be floating point, got {scores.dtype}")


def exclude_history(scores: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Set the scores of padding (column 0) and of every item in each user's input to -inf.

    Args:
        scores: float [B, N + 1].
        seqs: int64 [B, L] item ids in 0..N (0 = padding), the model's input sequences.

    Returns:
        A new float [B, N + 1] tensor (``scores`` is not modified).
    """
    _check_scores(scores)
    if seqs.dim() != 2 or seqs.shape[0] != scores.shape[0]:
        raise ValueError(
            f"seqs must be [B, L] with B = {scores.shape[0]} (from scores), got {tuple(seqs.shape)}"
        )
    if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) >= scores.shape[1]):
        raise ValueError(
            f"seqs item ids must be in 0..{scores.shape[1] - 1}, got range "
            f"{int(seqs.min())}..{int(seqs.max())}"
        )
    excluded = scores.clone()
    excluded.scatter_(1, seqs.to(device=scores.device, dtype=torch.int64), float("-inf"))
    excluded[:, 0] = float("-inf")
    return excluded


def exclude_pairs(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Set ``scores[rows[k], items[k]]`` and column 0 to -inf (e.g. full, untruncated histories
    from ``SequenceData.history_pairs``).

    Args:
        scores: float [B, N + 1].
        rows: int64 [K] in 0..B-1; items: int64 [K] in 0..N.

    Returns:
        A new float [B, N + 1] tensor.
    """
    _check_scores(scores)
    if rows.shape != items.shape or rows.dim() != 1:
        raise ValueError(
            f"rows and items must be 1-D of equal length, got {tuple(rows.shape)} and "
            f"{tuple(items.shape)}"
        )
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= scores.shape[0]:
            raise ValueError(f"rows must be in 0..{scores.shape[0] - 1}")
        if int(items.min()) < 0 or int(items.max()) >= scores.shape[1]:
            raise ValueError(f"items must be in 0..{scores.shape[1] - 1}")
    excluded = scores.clone()
    excluded[rows.to(scores.device), items.to(scores.device)] = float("-inf")
    excluded[:, 0] = float("-inf")
    return excluded


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the N real items.

    Args:
        scores: float [B, N + 1]; column 0 is ignored. NaN is rejected.
        targets: int64 [B] item ids in 1..N.

    Returns:
        int64 [B]: the number of items (ids 1..N) with a strictly greater score than the
        target (ties count in the target's favour); a target scored -inf gets N, the worst.
    """
    _check_scores(scores)
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must be [B] with B = {scores.shape[0]}, got {tuple(targets.shape)}"
        )
    num_items = scores.shape[1] - 1
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise ValueError(
            f"targets must be item ids in 1..{num_items}, got range "
            f"{int(targets.min())}..{int(targets.max())}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    targets = targets.to(device=scores.device, dtype=torch.int64)
    target_scores = scores.gather(1, targets[:, None])
    ranks = (scores[:, 1:] > target_scores).sum(dim=1)
    worst = torch.full_like(ranks, num_items)
    return torch.where(torch.isneginf(target_scores[:, 0]), worst, ranks)


def _as_numpy_ranks(ranks: torch.Tensor | np.ndarray | Iterable[int]) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    array = np.asarray(ranks)
    if array.ndim != 1:
        raise ValueError(f"ranks must be 1-D [B], got shape {array.shape}")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0):
        raise ValueError(f"ranks must be non-negative integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def rank_metric_values(
    ranks: torch.Tensor | np.ndarray | Iterable[int], ks: Iterable[int] = (5, 10, 20)
) -> dict[str, np.ndarray]:
    """Per-user recall/hit/ndcg/mrr@K ``[B]`` float64 for 0-based ranks ``[B]``.

    With one target per user: recall@K = hit@K = [rank < K];
    ndcg@K = 1 / log2(rank + 2) if rank < K; mrr@K = 1 / (rank + 1) if rank < K.
    """
    ks = _check_ks(ks)
    array = _as_numpy_ranks(ranks)
    values: dict[str, np.ndarray] = {}
    for k in ks:
        inside = array < k
        hits = inside.astype(np.float64)
        values[f"recall@{k}"] = hits
        values[f"hit@{k}"] = hits
        values[f"ndcg@{k}"] = np.where(inside, 1.0 / np.log2(array + 2.0), 0.0)
        values[f"mrr@{k}"] = np.where(inside, 1.0 / (array + 1.0), 0.0)
    return values


def rank_metric_sums(
    ranks: torch.Tensor | np.ndarray | Iterable[int], ks: Iterable[int] = (5, 10, 20)
) -> dict[str, float]:
    """Per-batch *sums* over users of :func:`rank_metric_values`."""
    return {name: float(v.sum()) for name, v in rank_metric_values(ranks, ks).items()}


def _runs(ranks) -> list[np.ndarray]:  # noqa: ANN001
    """One run ``[U]`` or several (``[R, U]`` array, or a list of ``[U]``) -> list of ``[U]``."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        return [_as_numpy_ranks(row) for row in ranks]
    if isinstance(ranks, (list, tuple)) and ranks and not np.isscalar(ranks[0]):
        return [_as_numpy_ranks(run) for run in ranks]
    return [_as_numpy_ranks(ranks)]


def paired_difference(
    ranks_a: torch.Tensor | np.ndarray | Iterable,
    ranks_b: torch.Tensor | np.ndarray | Iterable,
    metric: str = "ndcg@10",
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean difference A - B of ``metric`` over the SAME users, with a 95% paired bootstrap
    interval (users resampled with replacement, percentile method).

    ranks_a, ranks_b: 0-based target ranks of two models for the same users in the same
    order: ``[U]`` for one run, or several runs of a model (seeds) as ``[R, U]`` or a list of
    ``[U]``, whose per-user metric is averaged over the runs before users are resampled.
    Returns ``{"mean_a", "mean_b", "difference", "low", "high", "p_a_not_better"}``, the last
    being the bootstrap share of resamples where A does not beat B.
    """
    runs_a, runs_b = _runs(ranks_a), _runs(ranks_b)
    users = {run.shape for run in runs_a + runs_b}
    if len(users) != 1 or runs_a[0].size == 0:
        raise ValueError(
            "paired_difference needs ranks of the same non-empty set of users in every run, got "
            f"shapes {sorted(users)}"
        )
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    name, _, cutoff = metric.partition("@")
    if name not in METRIC_NAMES or not cutoff.isdigit() or int(cutoff) < 1:
        raise ValueError(f"metric must be one of {METRIC_NAMES} @ K >= 1, e.g. 'ndcg@10', "
                         f"got {metric!r}")
    key = f"{name}@{int(cutoff)}"

    def per_user(runs: list[np.ndarray]) -> np.ndarray:
        return np.mean([rank_metric_values(run, (int(cutoff),))[key] for run in runs], axis=0)

    values_a, values_b = per_user(runs_a), per_user(runs_b)
    diff = values_a - values_b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory: 1000 x U indices at a time
        count = min(1000, resamples - start)
        picks = rng.integers(0, diff.size, size=(count, diff.size))
        means[start : start + count] = diff[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean_a": float(values_a.mean()),
        "mean_b": float(values_b.mean()),
        "difference": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "p_a_not_better": float((means <= 0).mean()),
    }


def rank_metrics(
    ranks: torch.Tensor | np.ndarray | Iterable[int], ks: Iterable[int] = (5, 10, 20)
) -> dict[str, float]:
    """Means over users of :func:`rank_metric_sums` (NaN for an empty batch)."""
    array = _as_numpy_ranks(ranks)
    sums = rank_metric_sums(array, ks)
    count = len(array)
    return {name: (value / count if count else math.nan) for name, value in sums.items()}


class MetricAccumulator:
    """Adds per-batch ranks and reports means over all users, independent of batch size."""

    def __init__(self, ks: Iterable[int] = (5, 10, 20)) -> None:
        self.ks = _check_ks(ks)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = dict.fromkeys(rank_metric_sums([], self.ks), 0.0)
        self._squares: dict[str, float] = dict.fromkeys(self._sums, 0.0)
        self.num_users = 0

    def add(self, ranks: torch.Tensor | np.ndarray | Iterable[int]) -> None:
        """Add 0-based ranks [B] of one batch."""
        array = _as_numpy_ranks(ranks)
        for name, values in rank_metric_values(array, self.ks).items():
            self._sums[name] += float(values.sum())
            self._squares[name] += float(np.square(values).sum())
        self.num_users += len(array)

    def standard_errors(self) -> dict[str, float]:
        """Standard error of each mean over users (sample sd / sqrt(users); NaN below 2 users):
        how far the metric would move with another draw of users of the same size."""
        n = self.num_users
        if n < 2:
            return dict.fromkeys(self._sums, math.nan)
        errors = {}
        for name, total in self._sums.items():
            variance = max(self._squares[name] - total * total / n, 0.0) / (n - 1)
            errors[name] = math.sqrt(variance / n)
        return errors

    def compute(self) -> dict[str, float]:
        """Means per metric name plus ``"num_users"``; raises ValueError before any user."""
        if self.num_users == 0:
            raise ValueError("MetricAccumulator.compute() called before any ranks were added")
        results: dict[str, float] = {
            name: value / self.num_users for name, value in self._sums.items()
        }
        results["num_users"] = self.num_users
        return results

    def state_dict(self) -> Mapping[str, object]:
        return {"ks": list(self.ks), "sums": dict(self._sums), "num_users": self.num_users}
