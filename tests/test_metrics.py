"""Tests for canet.metrics: hand-computed cases, a slow reference, batch-size independence."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from canet.metrics import (
    MetricAccumulator,
    exclude_history,
    exclude_pairs,
    paired_difference,
    rank_metric_sums,
    rank_metrics,
    target_ranks,
)

NEG_INF = float("-inf")


def reference_rank(row: list[float], target: int) -> int:
    """Slow definition: count real items (ids >= 1) scored strictly above the target."""
    if row[target] == NEG_INF:
        return len(row) - 1
    return sum(1 for item in range(1, len(row)) if row[item] > row[target])


def reference_metrics(ranks: list[int], k: int) -> dict[str, float]:
    n = len(ranks)
    return {
        f"recall@{k}": sum(1 for r in ranks if r < k) / n,
        f"hit@{k}": sum(1 for r in ranks if r < k) / n,
        f"ndcg@{k}": sum(1 / math.log2(r + 2) for r in ranks if r < k) / n,
        f"mrr@{k}": sum(1 / (r + 1) for r in ranks if r < k) / n,
    }


def test_target_ranks_hand_computed() -> None:
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.3, 0.9],  # target 3 (0.3): items 2 (0.5) and 4 (0.9) above -> 2
            [9.0, 0.2, 0.2, 0.2, 0.1],  # target 2 ties with 1 and 3 -> in its favour: 0
            [9.0, 0.1, 0.5, 0.3, 0.9],  # target 4 is the best real item; column 0 ignored -> 0
        ]
    )
    ranks = target_ranks(scores, torch.tensor([3, 2, 4]))
    assert ranks.tolist() == [2, 0, 0]
    assert ranks.dtype == torch.int64


def test_neg_inf_target_gets_worst_rank() -> None:
    scores = torch.tensor([[0.0, NEG_INF, NEG_INF, 1.0, 2.0]])
    # Only two items are above -inf, but an excluded target must count as a full miss.
    assert target_ranks(scores, torch.tensor([1])).tolist() == [4]


def test_rank_metrics_hand_computed() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 30])
    results = rank_metrics(ranks, ks=(1, 5, 10))
    assert results["recall@1"] == pytest.approx(1 / 5)
    assert results["recall@5"] == pytest.approx(3 / 5)
    assert results["hit@10"] == pytest.approx(4 / 5)
    # ndcg@5: ranks 0, 1, 4 -> 1 + 1/log2(3) + 1/log2(6)
    assert results["ndcg@5"] == pytest.approx((1 + 0.6309297535714575 + 0.38685280723454163) / 5)
    # mrr@10: 1 + 1/2 + 1/5 + 1/10
    assert results["mrr@10"] == pytest.approx(1.8 / 5)
    assert results["mrr@1"] == pytest.approx(1 / 5)


def test_rank_metric_sums_are_sums() -> None:
    sums = rank_metric_sums(np.array([0, 0, 3]), ks=(2,))
    assert sums == {"recall@2": 2.0, "hit@2": 2.0, "ndcg@2": 2.0, "mrr@2": 2.0}


@pytest.mark.parametrize("seed", range(5))
def test_against_slow_reference_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    batch, num_items, seq_len = 23, 30, 6
    # Few distinct values so ties are common.
    rows = [[float(rng.randint(0, 5)) for _ in range(num_items + 1)] for _ in range(batch)]
    seqs = [[rng.randint(0, num_items) for _ in range(seq_len)] for _ in range(batch)]
    targets = [rng.randint(1, num_items) for _ in range(batch)]

    excluded = exclude_history(torch.tensor(rows), torch.tensor(seqs))
    expected_rows = [
        [NEG_INF if (item == 0 or item in seqs[b]) else score for item, score in enumerate(rows[b])]
        for b in range(batch)
    ]
    assert excluded.tolist() == expected_rows

    ranks = target_ranks(excluded, torch.tensor(targets)).tolist()
    expected_ranks = [reference_rank(expected_rows[b], targets[b]) for b in range(batch)]
    assert ranks == expected_ranks
    for k in (1, 5, 10):
        got = rank_metrics(ranks, ks=(k,))
        for name, value in reference_metrics(expected_ranks, k).items():
            assert got[name] == pytest.approx(value)


def test_exclude_history_does_not_modify_input_and_excludes_repeated_target() -> None:
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0], [5.0, 1.0, 2.0, 3.0]])
    original = scores.clone()
    seqs = torch.tensor([[0, 0, 3], [1, 2, 0]])
    excluded = exclude_history(scores, seqs)
    assert torch.equal(scores, original)
    assert excluded.tolist() == [[NEG_INF, 1.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, NEG_INF, 3.0]]
    # Target 3 repeats a history item of user 0: it is excluded and ranked last (N = 3).
    assert target_ranks(excluded, torch.tensor([3, 3])).tolist() == [3, 0]


def test_exclude_pairs_matches_exclude_history() -> None:
    scores = torch.randn(3, 8)
    seqs = torch.tensor([[0, 4, 5], [1, 1, 7], [0, 0, 0]])
    rows = torch.tensor([0, 0, 1, 1, 1])
    items = torch.tensor([4, 5, 1, 1, 7])
    assert torch.equal(exclude_pairs(scores, rows, items), exclude_history(scores, seqs))


def test_accumulator_independent_of_batch_size() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 41, generator=generator)
    targets = torch.randint(1, 41, (50,), generator=generator)
    ranks = target_ranks(scores, targets)
    expected = rank_metrics(ranks)
    for batch_size in (1, 7, 50):
        accumulator = MetricAccumulator()
        for first in range(0, 50, batch_size):
            accumulator.add(
                target_ranks(
                    scores[first : first + batch_size], targets[first : first + batch_size]
                )
            )
        results = accumulator.compute()
        assert results["num_users"] == 50
        for name, value in expected.items():
            assert results[name] == pytest.approx(value, abs=1e-12), (batch_size, name)


def test_accumulator_empty_raises() -> None:
    with pytest.raises(ValueError, match="before any ranks"):
        MetricAccumulator().compute()


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (torch.zeros(2, 5), torch.tensor([0, 1]), "1..4"),
        (torch.zeros(2, 5), torch.tensor([1, 5]), "1..4"),
        (torch.zeros(2, 5), torch.tensor([1]), "targets must be"),
        (torch.zeros(5), torch.tensor([1]), "scores must be"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]), "NaN"),
    ],
)
def test_target_ranks_validates(scores: torch.Tensor, targets: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        target_ranks(scores, targets)


def test_exclude_history_validates_ids() -> None:
    with pytest.raises(ValueError, match="0..3"):
        exclude_history(torch.zeros(1, 4), torch.tensor([[4]]))


def test_rank_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        rank_metrics([-1, 0])
    with pytest.raises(ValueError):
        rank_metrics([0, 1], ks=(0,))


def test_standard_errors_match_numpy_and_need_two_users() -> None:
    rng = np.random.default_rng(3)
    ranks = rng.integers(0, 40, size=101)
    accumulator = MetricAccumulator(ks=(10,))
    for first in range(0, 101, 13):
        accumulator.add(ranks[first : first + 13])
    ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    mrr = np.where(ranks < 10, 1.0 / (ranks + 1.0), 0.0)
    errors = accumulator.standard_errors()
    assert errors["ndcg@10"] == pytest.approx(ndcg.std(ddof=1) / math.sqrt(101), rel=1e-9)
    assert errors["mrr@10"] == pytest.approx(mrr.std(ddof=1) / math.sqrt(101), rel=1e-9)
    single = MetricAccumulator(ks=(10,))
    single.add([3])
    assert all(math.isnan(v) for v in single.standard_errors().values())


def test_paired_difference() -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 200, size=400)
    same = paired_difference(base, base, "ndcg@10", resamples=500)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0
    assert same["p_a_not_better"] == 1.0
    better = np.maximum(base - 30, 0)  # every target ranked 30 places higher
    result = paired_difference(better, base, "recall@20", resamples=2000, seed=1)
    hits_a, hits_b = (better < 20).mean(), (base < 20).mean()
    assert result["mean_a"] == pytest.approx(hits_a) and result["mean_b"] == pytest.approx(hits_b)
    assert result["difference"] == pytest.approx(hits_a - hits_b)
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert result["p_a_not_better"] < 0.01
    # Reproducible for a seed; the interval narrows as users are added.
    assert paired_difference(better, base, "recall@20", resamples=2000, seed=1) == result
    wide = paired_difference(better[:50], base[:50], "recall@20", resamples=2000)
    assert wide["high"] - wide["low"] > result["high"] - result["low"]
    # Several runs per model: per-user values are averaged over runs first.
    runs = paired_difference([better, base], np.stack([base, base]), "recall@20", resamples=500)
    assert runs["mean_a"] == pytest.approx((hits_a + hits_b) / 2)
    assert runs["difference"] == pytest.approx((hits_a - hits_b) / 2)
    assert paired_difference(torch.from_numpy(base), [base], "ndcg@10", resamples=50)[
        "difference"] == 0


@pytest.mark.parametrize(
    ("a", "b", "metric", "message"),
    [
        ([1, 2], [1], "ndcg@10", "same non-empty set"),
        ([[1, 2], [1, 2, 3]], [1, 2], "ndcg@10", "same non-empty set"),
        ([], [], "ndcg@10", "same non-empty set"),
        ([1], [1], "ndcg10", "metric must be one of"),
        ([1], [1], "auc@10", "metric must be one of"),
        ([1], [1], "ndcg@0", "metric must be one of"),
    ],
)
def test_paired_difference_rejects_bad_input(a, b, metric, message) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b, metric)
