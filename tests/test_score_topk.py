"""canet.ops.score_topk: native ops vs the pure-PyTorch reference and a float64 brute force."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from canet import _ext
from canet.ops import score_topk, score_topk_reference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

native_cpu = pytest.mark.skipif(
    not _ext.has_kernel("score_topk", "cpu"), reason=f"canet._C not loaded: {_ext.reason()}"
)


def native(*args):
    hidden, sizes, weight, bias, history, k = args
    return torch.ops.canet.score_topk(hidden, sizes, weight, bias, history, k)


def make_inputs(
    gen: torch.Generator,
    batch: int,
    items: int,
    h_max: int,
    dtype: torch.dtype,
    *,
    integer: bool = False,
    history_len: int = 7,
    sizes: list[int] | None = None,
):
    """Random inputs; hidden holds NaN beyond each user's size to prove it is never read."""
    if integer:  # small integers: every dot product is exact, so results must match bit for bit
        hidden = torch.randint(-3, 4, (batch, h_max), generator=gen).to(torch.float64)
        weight = torch.randint(-3, 4, (items + 1, h_max), generator=gen).to(torch.float64)
        bias = torch.randint(-3, 4, (items + 1,), generator=gen).to(torch.float64)
    else:
        hidden = torch.randn(batch, h_max, generator=gen, dtype=torch.float64)
        weight = torch.randn(items + 1, h_max, generator=gen, dtype=torch.float64)
        bias = torch.randn(items + 1, generator=gen, dtype=torch.float64)
    if sizes is None:
        choices = torch.tensor(sorted({h_max, max(1, h_max // 2), max(1, 3 * h_max // 4), 5}))
        sizes_t = choices[torch.randint(0, len(choices), (batch,), generator=gen)]
    else:
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
    for b, h in enumerate(sizes_t.tolist()):
        hidden[b, h:] = float("nan")
    history = torch.randint(0, items + 1, (batch, history_len), generator=gen)
    return hidden.to(dtype), sizes_t, weight.to(dtype), bias.to(dtype), history


def brute_force(hidden, sizes, weight, bias, history) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 scores [B, N+1] of the rounded inputs, and the candidate mask."""
    batch, rows = hidden.shape[0], weight.shape[0]
    scores = torch.empty(batch, rows, dtype=torch.float64)
    for b in range(batch):
        h = int(sizes[b])
        x = hidden[b, :h].double().cpu()
        scores[b] = weight[:, :h].double().cpu() @ x + bias.double().cpu()
    cand = torch.ones(batch, rows, dtype=torch.bool)
    cand[:, 0] = False
    if history is not None and history.numel():
        cand.scatter_(1, history.cpu(), False)
    return scores, cand


def check_topk(ids, scores, inputs, k, tol) -> None:
    """ids/scores are a valid top-k: right values, best first, ties by id, nothing missed."""
    hidden, sizes, weight, bias, history = inputs
    exact, cand = brute_force(hidden, sizes, weight, bias, history)
    ids, scores = ids.cpu(), scores.cpu().double()
    batch = hidden.shape[0]
    assert ids.shape == (batch, k) and scores.shape == (batch, k) and ids.dtype == torch.int64
    for b in range(batch):
        n_cand = int(cand[b].sum())
        got = ids[b].tolist()
        filled = min(k, n_cand)
        assert all(i == -1 for i in got[filled:]), (b, got)
        assert bool(torch.isneginf(scores[b, filled:]).all())
        top = got[:filled]
        assert len(set(top)) == filled and all(cand[b, i] for i in top), (b, top)
        torch.testing.assert_close(scores[b, :filled], exact[b, top], atol=tol, rtol=tol)
        s = scores[b, :filled]
        assert bool((s[1:] <= s[:-1]).all()), "not best first"
        same = s[1:] == s[:-1]
        assert all(top[j] < top[j + 1] for j in range(filled - 1) if same[j]), "tie order"
        if filled < n_cand:  # nothing left out scores clearly above the k-th
            rest = cand[b].clone()
            rest[top] = False
            assert float(exact[b][rest].max()) <= float(exact[b, top[-1]]) + 2 * tol


def tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


# --- the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_against_brute_force(gen, dtype) -> None:
    inputs = make_inputs(gen, 9, 233, 24, dtype)
    ids, scores = score_topk_reference(*inputs, k=17)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_topk(ids, scores, inputs, 17, tolerance(dtype))


def test_reference_ties_prefer_smaller_ids() -> None:
    weight = torch.zeros(6, 2)
    bias = torch.tensor([9.0, 1.0, 2.0, 2.0, 1.0, 2.0])  # item 0 (padding) scores highest
    hidden = torch.zeros(1, 2)
    ids, scores = score_topk_reference(hidden, torch.tensor([2]), weight, bias, None, k=5)
    assert ids.tolist() == [[2, 3, 5, 1, 4]] and scores.tolist() == [[2, 2, 2, 1, 1]]


# --- the CPU op -------------------------------------------------------------------------------


@native_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 10, 200])
def test_cpu_matches_reference_exactly_on_integers(gen, dtype, k) -> None:
    # Integer data: scores are exact in every dtype, so ties abound and must break identically.
    inputs = make_inputs(gen, 13, 517, 40, dtype, integer=True)
    ids, scores = native(*inputs, k)
    ref_ids, ref_scores = score_topk_reference(*inputs, k=k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(scores, ref_scores)
    check_topk(ids, scores, inputs, k, 0.0)


@native_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "items", "h_max", "k"), [(1, 1, 8, 1), (67, 1001, 96, 10),
                                                             (5, 333, 128, 200)])
def test_cpu_against_brute_force(gen, dtype, batch, items, h_max, k) -> None:
    inputs = make_inputs(gen, batch, items, h_max, dtype, history_len=0 if items == 1 else 11)
    ids, scores = score_topk(*inputs, k=k)
    check_topk(ids, scores, inputs, k, tolerance(dtype))


@native_cpu
def test_cpu_fewer_candidates_than_k_pads(gen) -> None:
    hidden, sizes, weight, bias, _ = make_inputs(gen, 3, 250, 16, torch.float32)
    history = torch.arange(1, 251).repeat(3, 1)[:, :245]  # items 246..250 left for everyone
    history[1] = torch.arange(0, 245)  # user 1 also keeps item 245 (0 is padding)
    history[2, :] = 0  # user 2 excludes nothing
    ids, scores = score_topk(hidden, sizes, weight, bias, history, k=200)
    ref = score_topk_reference(hidden, sizes, weight, bias, history, k=200)
    assert torch.equal(ids, ref[0]) and torch.allclose(scores, ref[1], atol=1e-5, rtol=1e-5)
    assert sorted(ids[0, :5].tolist()) == [246, 247, 248, 249, 250] and ids[0, 5:].eq(-1).all()
    assert sorted(ids[1, :6].tolist()) == [245, 246, 247, 248, 249, 250] and ids[1, 6:].eq(-1).all()
    assert ids[2].ge(1).all()
    check_topk(ids, scores, (hidden, sizes, weight, bias, history), 200, 1e-4)


@native_cpu
def test_cpu_empty_history_and_none_agree(gen) -> None:
    hidden, sizes, weight, bias, _ = make_inputs(gen, 4, 90, 8, torch.float32)
    a = score_topk(hidden, sizes, weight, bias, None, k=7)
    b = score_topk(hidden, sizes, weight, bias, torch.empty(4, 0, dtype=torch.int64), k=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    check_topk(*a, (hidden, sizes, weight, bias, None), 7, 1e-4)


@native_cpu
def test_cpu_ties_and_non_finite_scores() -> None:
    weight = torch.zeros(8, 2)
    weight[:, 0] = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1])
    bias = torch.tensor([0.0, 0, float("-inf"), 0, float("nan"), 0, 5, 0])
    hidden = torch.tensor([[1.0, float("nan")]])
    ids, scores = torch.ops.canet.score_topk(hidden, torch.tensor([1]), weight, bias, None, 7)
    # item 6 best, then the tie 1,3,5,7 by id, then -inf (item 2) before NaN-as--inf (item 4).
    assert ids.tolist() == [[6, 1, 3, 5, 7, 2, 4]]
    assert scores[0, :5].tolist() == [6, 1, 1, 1, 1] and torch.isneginf(scores[0, 5:]).all()
    ref = score_topk_reference(hidden, torch.tensor([1]), weight, bias, None, k=7)
    assert torch.equal(ids, ref[0]) and torch.equal(scores, ref[1])


@native_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_spans_item_chunks_user_tiles_and_sizes(gen, dtype) -> None:
    # Several 512-item chunks with a ragged tail, several user tiles, hidden size 0 (scores are
    # the bias) next to full-width users, long histories, and a weight read through a view with
    # a row stride wider than H.
    batch, items, h_max = 70, 1300, 24
    sizes = [0, 24, 7, 24, 1, 12] * 11 + [24, 0, 5, 24]
    hidden, sizes_t, weight, bias, history = make_inputs(
        gen, batch, items, h_max, dtype, history_len=600, sizes=sizes
    )
    wide = torch.full((items + 1, h_max + 5), float("nan"), dtype=dtype)
    wide[:, :h_max] = weight
    for k in (1, 10, 200):
        inputs = (hidden, sizes_t, wide[:, :h_max], bias, history)
        ids, scores = score_topk(*inputs, k=k)
        check_topk(ids, scores, (hidden, sizes_t, weight, bias, history), k, tolerance(dtype))


@native_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_scores_do_not_depend_on_batch_threads_or_position(gen, dtype) -> None:
    # Equal weight rows at chunk edges and the ragged tail score bit-equal, so the tie rule
    # puts them in id order; a user's result is the same bits alone, in a batch, and at any
    # thread count (the GEMM that filters may round differently in each of these).
    batch, items, h_max = 70, 1400, 48
    sizes = [48] * 25 + [36] * 25 + [24] * 20  # runs of 17+ users: the GEMM-and-bound path
    hidden, sizes, weight, bias, history = make_inputs(gen, batch, items, h_max, dtype,
                                                       sizes=sizes)
    copies = [5, 511, 512, 1023, 1399, 1400]
    weight[copies] = weight[5].clone()
    bias[copies] = bias[5].clone()
    # Copies of row 5 rank high: every user's hidden state leans towards it.
    hidden[:, :] = torch.where(hidden.isnan(), hidden, hidden.abs() * weight[5].sign())
    history[:] = 0
    ids, scores = score_topk(hidden, sizes, weight, bias, history, k=50)
    for b in range(batch):
        got = [i for i in ids[b].tolist() if i in copies]
        assert got == sorted(got), (b, ids[b].tolist())
        at = [ids[b].tolist().index(i) for i in got]
        assert len({float(scores[b, j]) for j in at}) <= 1, (b, scores[b, at])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for b in (0, 17, batch - 1):
                alone = score_topk(hidden[b : b + 1], sizes[b : b + 1], weight, bias,
                                   history[b : b + 1], k=50)
                assert torch.equal(alone[0][0], ids[b]) and torch.equal(alone[1][0], scores[b])
    finally:
        torch.set_num_threads(before)


@native_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_small_batches_split_the_catalogue_across_threads(gen, dtype) -> None:
    # B below one tile per thread: the items are split into parts whose top-k are merged. The
    # result must be the one-thread result, bit for bit, and a valid top-k.
    hidden, sizes, weight, bias, history = make_inputs(gen, 3, 20000, 32, dtype, history_len=900)
    weight[17000:17010] = weight[3].clone()  # ties across parts
    bias[17000:17010] = bias[3].clone()
    before = torch.get_num_threads()
    try:
        for k in (1, 37, 200):
            torch.set_num_threads(1)
            want = score_topk(hidden, sizes, weight, bias, history, k=k)
            check_topk(*want, (hidden, sizes, weight, bias, history), k, tolerance(dtype))
            for threads in (2, 3, 4):
                torch.set_num_threads(threads)
                got = score_topk(hidden, sizes, weight, bias, history, k=k)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), threads
    finally:
        torch.set_num_threads(before)


@native_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_accepts_parameters_with_and_without_grad_mode(gen, dtype) -> None:
    # A model's output layer is a Parameter (requires_grad): no autograd error, in grad mode or
    # not, with several user tiles over several threads.
    hidden, sizes, weight, bias, history = make_inputs(gen, 40, 700, 16, dtype)
    w, b = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    want = score_topk(hidden, sizes, weight, bias, history, k=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = score_topk(hidden, sizes, w, b, history, k=9)
        with torch.no_grad():
            got_no_grad = score_topk(hidden, sizes, w, b, history, k=9)
    finally:
        torch.set_num_threads(before)
    for ids, scores in (got, got_no_grad):
        assert torch.equal(ids, want[0]) and torch.equal(scores, want[1])
        assert not scores.requires_grad


@native_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_non_finite_values_in_a_mixed_tile(gen, dtype) -> None:
    # Users of sizes 0..8 share a tile: NaN/inf in weight columns past a small user's size
    # (read for the larger ones), +-inf and NaN biases, inf in one user's own hidden state.
    # Integer data: the reference's scores are exact, so the results must match bit for bit.
    # 17+ users per size: the runs take the GEMM-and-bound path, not exact dots alone.
    inputs = make_inputs(gen, 80, 700, 8, dtype, integer=True,
                         sizes=[0, 1, 4, 8, 1, 0, 8, 3, 4, 2, 8, 1, 1, 4, 8, 8] * 5)
    hidden, sizes, weight, bias, history = inputs
    weight[torch.randint(1, 701, (60,), generator=gen), 4:] = float("nan")
    weight[torch.randint(1, 701, (20,), generator=gen), 2] = float("inf")
    bias[torch.randint(1, 701, (30,), generator=gen)] = float("inf")
    bias[torch.randint(1, 701, (30,), generator=gen)] = float("-inf")
    bias[torch.randint(1, 701, (10,), generator=gen)] = float("nan")
    hidden[6, 1] = float("inf")
    for k in (1, 50, 200):
        ids, scores = native(*inputs, k)
        ref_ids, ref_scores = score_topk_reference(*inputs, k=k)
        assert torch.equal(ids, ref_ids), k
        assert torch.equal(scores, ref_scores), k


@native_cpu
@settings(max_examples=60)
@given(
    batch=st.integers(1, 40),
    items=st.integers(1, 5000),
    h_max=st.integers(1, 20),
    k=st.integers(1, 200),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_equals_reference_bit_for_bit_on_integers(batch, items, h_max, k, dtype, threads, seed):
    # Integer data: every score is exact in any summation order, so the op (GEMM filter, exact
    # re-scoring, catalogue parts, any thread count) must give the reference's bits and order.
    k = min(k, items)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, h_max + 1, (batch,), generator=gen).tolist()
    inputs = make_inputs(gen, batch, items, h_max, dtype, integer=True,
                         history_len=int(torch.randint(0, 60, (1,), generator=gen)), sizes=sizes)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ids, scores = native(*inputs, k)
    finally:
        torch.set_num_threads(before)
    ref_ids, ref_scores = score_topk_reference(*inputs, k=k)
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


@native_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_tiny_hidden_states_keep_exact_scores(gen, dtype) -> None:
    # |x|^2 underflows (x ~ 2^-76 in fp32, 2^-540 in fp64) while the products x_j w_j are
    # ordinary numbers, and the items' scores differ by a few ulps: the filter's bound must not
    # collapse to 0, or the GEMM's rounding hides exact winners. Each user's result in a batch
    # of 24 (one run past 16 users: the GEMM path) must be its result alone (exact dots only).
    tiny, big, spread = (2.0**-76, 2.0**60, 1e-7) if dtype == torch.float32 else (
        2.0**-540, 2.0**500, 1e-16)
    batch, items, h = 24, 3000, 48
    hidden = (torch.randn(batch, h, generator=gen, dtype=torch.float64) * tiny).to(dtype)
    row = torch.randn(1, h, generator=gen, dtype=torch.float64)
    noise = torch.randn(items + 1, h, generator=gen, dtype=torch.float64)
    weight = ((row + spread * noise) * big).to(dtype)
    bias, sizes = torch.zeros(items + 1, dtype=dtype), torch.full((batch,), h)
    assert float((hidden[0] * hidden[0]).sum()) < torch.finfo(dtype).tiny  # underflows
    ids, scores = torch.ops.canet.score_topk(hidden, sizes, weight, bias, None, 10)
    for b in range(batch):
        alone = torch.ops.canet.score_topk(hidden[b : b + 1], sizes[b : b + 1], weight, bias,
                                           None, 10)
        assert torch.equal(alone[0][0], ids[b]) and torch.equal(alone[1][0], scores[b]), b


@native_cpu
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_cpu_reduced_precision_matmul_setting_changes_nothing(gen, precision) -> None:
    # With oneDNN's float32 matmul allowed to run in bf16/tf32, the filtering GEMM may round
    # far more coarsely (AMX CPUs); the kernel widens its bound, and scores stay exact.
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
    inputs = make_inputs(gen, 40, 3000, 64, torch.float32)
    want = score_topk(*inputs, k=20)
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = precision
        got = score_topk(*inputs, k=20)
    finally:
        matmul.fp32_precision = before
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@native_cpu
def test_cpu_reads_strided_hidden_in_place(gen) -> None:
    hidden, sizes, weight, bias, history = make_inputs(gen, 6, 120, 16, torch.float32)
    wide = torch.full((6, 3, 16), float("nan"))
    wide[:, 2] = hidden
    a = score_topk(wide[:, 2], sizes, weight, bias, history, k=9)
    b = score_topk(hidden, sizes, weight, bias, history, k=9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- validation -------------------------------------------------------------------------------


def _good():
    hidden = torch.randn(3, 8)
    return [hidden, torch.tensor([8, 4, 2]), torch.randn(21, 8), torch.randn(21),
            torch.tensor([[1, 2], [0, 0], [20, 3]])]


@pytest.mark.parametrize(
    ("change", "k", "message"),
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int64)), 5, "hidden must be float32"),
        (lambda a: a.__setitem__(2, a[2].half()), 5, "weight must have hidden's dtype"),
        (lambda a: a.__setitem__(1, a[1].int()), 5, "hidden_sizes must be int64"),
        (lambda a: a.__setitem__(1, torch.tensor([8, 4])), 5, "hidden_sizes must be [B] = [3]"),
        (lambda a: a.__setitem__(1, torch.tensor([8, 9, 2])), 5, "got a value of 9"),
        (lambda a: a.__setitem__(1, torch.tensor([8, -1, 2])), 5, "got a value of -1"),
        (lambda a: a.__setitem__(0, a[0][0]), 5, "hidden must be 2-D"),
        (lambda a: a.__setitem__(3, torch.randn(20)), 5, "bias must be [N+1] = [21]"),
        (lambda a: a.__setitem__(2, torch.randn(1, 8)), 5, "weight must be [N+1, H] with N >= 1"),
        (lambda a: a.__setitem__(4, torch.tensor([[1, 21]] * 3)), 5, "history ids must be in"),
        (lambda a: a.__setitem__(4, torch.tensor([[1, 2]])), 5, "history must be [B, L]"),
        (lambda a: a.__setitem__(4, a[4].int()), 5, "history must be int64"),
        (lambda a: None, 0, "k must be an int in [1, 20]"),
        (lambda a: None, 21, "k must be an int in [1, 20]"),
        (lambda a: None, True, "k must be an int"),
        (lambda a: a.__setitem__(4, [[1]]), 5, "history must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(change, k, message) -> None:
    args = _good()
    change(args)
    for fn in (score_topk, score_topk_reference):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(*args, k=k)


def test_k_above_200_is_rejected() -> None:
    args = _good()
    args[2], args[3] = torch.randn(302, 8), torch.randn(302)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 200\], got 201"):
        score_topk(*args, k=201)


@native_cpu
def test_native_op_checks_inputs() -> None:
    args = _good()
    with pytest.raises(RuntimeError, match="hidden_sizes must be in"):
        torch.ops.canet.score_topk(args[0], torch.tensor([8, 9, 2]), *args[2:], 5)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.canet.score_topk(*args, 21)


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize(("batch", "items", "h_max", "k"), [(1, 1, 8, 1), (67, 1001, 96, 10),
                                                             (131, 5003, 128, 200),
                                                             (5, 40000, 128, 10)])
def test_cuda_matches_cpu(gen, dtype, batch, items, h_max, k) -> None:
    assert _ext.has_kernel("score_topk", "cuda"), "extension built without the CUDA kernel"
    for integer in (True, False):
        inputs = make_inputs(gen, batch, items, h_max, dtype, integer=integer,
                             history_len=0 if items == 1 else 11)
        ids, scores = score_topk(*(t.cuda() for t in inputs), k=k)
        assert ids.is_cuda and scores.dtype == torch.float32
        if integer:  # exact arithmetic: must equal the reference bit for bit, ties included
            ref = score_topk_reference(*inputs, k=k)
            assert torch.equal(ids.cpu(), ref[0]) and torch.equal(scores.cpu(), ref[1])
        check_topk(ids, scores, inputs, k, 1e-3 if integer is False else 0.0)


@pytest.mark.gpu
def test_cuda_fewer_candidates_than_k_pads(gen) -> None:
    hidden, sizes, weight, bias, _ = make_inputs(gen, 70, 250, 64, torch.bfloat16, integer=True)
    history = torch.arange(1, 251).repeat(70, 1)[:, :245]
    args = (hidden, sizes, weight, bias, history)
    ids, scores = score_topk(*(t.cuda() for t in args), k=200)
    ref = score_topk_reference(*args, k=200)
    assert torch.equal(ids.cpu(), ref[0]) and torch.equal(scores.cpu(), ref[1])


SANITIZED = """
import torch, canet, canet.ops as ops
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 36, (300,), generator=g).cuda()
table = canet.RoutingSpace().table()
ops.plan(ids, table.cuda(), check_ids=False)
hidden = torch.randn(67, 128, generator=g).bfloat16().cuda()
sizes = torch.randint(1, 129, (67,), generator=g).cuda()
weight = torch.randn(1001, 128, generator=g).bfloat16().cuda()
bias = torch.randn(1001, generator=g).bfloat16().cuda()
history = torch.randint(0, 1001, (67, 11), generator=g).cuda()
ops.score_topk(hidden, sizes, weight, bias, history, k=200, check_values=False)
torch.cuda.synchronize()
print("sanitized run ok")
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_compute_sanitizer_memcheck(tmp_path) -> None:
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin").glob(
            "compute-sanitizer") if p.exists()), None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    # Without them the script would run the PyTorch references and prove nothing.
    assert _ext.has_kernel("plan", "cuda") and _ext.has_kernel("score_topk", "cuda"), (
        "extension built without the CUDA kernels: nothing to sanitize"
    )
    script = tmp_path / "sanitized.py"
    script.write_text(textwrap.dedent(SANITIZED))
    # benches/gpu_check.sh sets the timeout below its own step limit, so that a slow run still
    # reports what the sanitizer printed.
    timeout = float(os.environ.get("CANET_SANITIZER_TIMEOUT_S", "600"))
    # A session of its own, so that a timeout kills the sanitized python too.
    proc = subprocess.Popen(
        [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"compute-sanitizer ran past {timeout:g} s; its output:\n"
                    f"{stdout[-4000:]}{stderr[-4000:]}")
    assert proc.returncode == 0 and "sanitized run ok" in stdout, stdout[-4000:] + stderr[-4000:]


def test_op_benchmark_dry_run_works_on_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benches/bench_ops_gpu.py"), "--dry-run", "--batch", "64",
         "--items", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "dry run" in proc.stdout, proc.stderr
