"""What is specific to the native cpu backend: the ops' own checks, the router, threads,
work-item sizes, larger batches and strided inputs. (Engine-level equality with the model is
covered for every backend in test_engine.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import MAX_LEN, NUM_ITEMS, batch, make_model, reference, relative_error

from canet import Engine, RoutingSpace, _ext, backends
from canet.backends import BackendUnavailableError
from canet.ops import plan

pytestmark = pytest.mark.skipif(
    backends.availability("cpu")["cpu"] is not None,
    reason=f"cpu backend unavailable: {backends.availability('cpu')['cpu']}",
)


@pytest.fixture(scope="module")
def model64():
    return make_model(torch.float64)


@pytest.fixture(scope="module")
def engine64(model64):
    return Engine(model64, backend="cpu")


def op_args(engine, seqs, ids):
    p = plan(ids, engine._impl.table)
    impl = engine._impl
    return [seqs, p.order, p.group_config, p.group_offsets, impl.table, list(impl.weights),
            impl.heads]


def routed(*args, **kwargs):
    return torch.ops.canet.routed_scores(*args, **kwargs)


def test_router_logits_equal_model_router(model64, engine64):
    seqs = batch(37, seed=11)
    got = engine64._impl.router_logits(seqs)
    with torch.no_grad():
        want = model64.router(seqs)
    assert got.shape == want.shape == (37, model64.space.n_configs)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_router_logits_float32():
    model = make_model(torch.float32)
    engine = Engine(model, backend="cpu")
    seqs = batch(20, seed=12)
    with torch.no_grad():
        want = model.router(seqs)
    torch.testing.assert_close(engine._impl.router_logits(seqs), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(engine.route(seqs), model.route(seqs))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_scores_independent_of_thread_count(dtype, tol):
    # The split into work items does not depend on the thread count (up to 4 threads); what
    # remains is BLAS rounding (one thread vs inside a parallel region), at float noise level.
    model = make_model(dtype)
    engine = Engine(model, backend="cpu")
    seqs = batch(150, seed=13)
    ids = torch.randint(0, 36, (150,), generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine.score(seqs, ids)
        logits_one = engine._impl.router_logits(seqs)
        torch.set_num_threads(2)
        two = engine.score(seqs, ids)
        logits_two = engine._impl.router_logits(seqs)
        assert torch.equal(engine.score(seqs, ids), two)  # deterministic at a fixed count
    finally:
        torch.set_num_threads(before)
    assert relative_error(two, one) < tol
    assert ((logits_two - logits_one).abs().max() / logits_one.abs().max()).item() < tol


@pytest.mark.parametrize("block_users", [1, 2, 5, 64])
def test_scores_independent_of_block_size(model64, engine64, block_users):
    seqs = batch(60, seed=14)
    ids = torch.randint(0, 36, (60,), generator=torch.Generator().manual_seed(4))
    p = plan(ids, engine64._impl.table)
    auto = engine64._impl.scores(seqs, p)
    fixed = engine64._impl.scores(seqs, p, block_users=block_users)
    torch.testing.assert_close(fixed, auto, rtol=1e-12, atol=1e-12)
    assert relative_error(fixed, reference(model64, seqs, ids)) < 1e-10


def test_large_batch_many_items_per_group(model64, engine64):
    # 400 users in 3 configs: the automatic split makes several items per group.
    seqs = batch(400, seed=15)
    ids = torch.tensor([35, 0, 17])[torch.randint(0, 3, (400,), generator=torch.Generator())]
    got = engine64.score(seqs, ids)
    assert relative_error(got, reference(model64, seqs, ids)) < 1e-10
    logits = engine64._impl.router_logits(seqs)
    with torch.no_grad():
        torch.testing.assert_close(logits, model64.router(seqs), rtol=1e-11, atol=1e-12)


def test_no_padding_and_middle_padding(model64, engine64):
    # Padding inside a sequence (not only on the left) is masked the same way.
    seqs = batch(12, seed=16, heavy_padding=False)
    seqs[:4, 3] = 0
    seqs[4:8, :5] = 0
    seqs[8, :-1] = 0
    ids = torch.arange(12) * 3
    assert relative_error(engine64.score(seqs, ids), reference(model64, seqs, ids)) < 1e-10


def test_non_contiguous_seqs(model64, engine64):
    wide = batch(9, seed=17, max_len=2 * MAX_LEN)
    seqs = wide[:, 1::2]  # every other column: a strided view
    seqs[:, -1] = wide[:, -1]
    assert not seqs.is_contiguous()
    ids = torch.arange(9) * 4
    want = reference(model64, seqs.contiguous(), ids)
    assert relative_error(engine64.score(seqs, ids), want) < 1e-10
    args = op_args(engine64, seqs, ids)
    assert relative_error(routed(*args), want) < 1e-10
    assert torch.equal(
        engine64._impl.router_logits(seqs), engine64._impl.router_logits(seqs.contiguous())
    )


def test_scores_see_in_place_weight_updates():
    model = make_model(torch.float64)
    engine = Engine(model, backend="cpu")
    seqs, ids = batch(4, 2), torch.tensor([1, 20, 35, 7])
    with torch.no_grad():
        model.supernet.blocks[0].res_scale1.mul_(0.5)
        model.supernet.out.bias += 1.0
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 1e-10


# -- packed float32 GEMM weights (csrc/cpu/packed_gemm.h) -----------------------------------
ODD_SPACE = RoutingSpace(depths=(1, 3), hidden=(8, 24, 40), emb=(4, 12), heads=4)


def _unpacked(engine: Engine):
    """The same engine with the ATen GEMMs (the op without packed weights)."""
    impl = engine._impl

    class Unpacked:
        def __enter__(self):
            impl._packable = False

        def __exit__(self, *exc):
            impl._packable = True

    return Unpacked()


@pytest.mark.parametrize("space", [None, ODD_SPACE], ids=["paper", "odd"])
def test_packed_gemms_equal_aten_gemms_and_the_float64_model(space):
    # Hidden sizes 8/24/40 leave partial 16-column panels; groups of 1..n users (rows 1..5
    # past a multiple of 6 in the micro-kernel), heavy padding, a one-position user.
    model = make_model(torch.float32, space=space)
    engine = Engine(model, backend="cpu")
    assert engine._impl.packed(), "float32 weights are packed"
    n = len(model.space)
    seqs = batch(3 * n + 5, seed=31)
    ids = torch.randint(0, n, (seqs.shape[0],), generator=torch.Generator().manual_seed(8))
    ids[:3] = 0  # one config with a group of several users
    packed = engine.score(seqs, ids)
    with _unpacked(engine):
        aten = engine.score(seqs, ids)
    want = reference(model.double(), seqs, ids)
    model.float()
    # As accurate as the ATen (MKL) float32 GEMMs, against the float64 model: the dtype rule.
    assert relative_error(packed, want) <= 2 * relative_error(aten, want) + 1e-6
    assert relative_error(packed, aten) < 3e-5
    hidden = engine._impl.last_hidden(seqs, engine._plan(ids))
    with _unpacked(engine):
        assert relative_error(hidden, engine._impl.last_hidden(seqs, engine._plan(ids))) < 3e-5


def test_one_user_on_two_threads_is_bitwise_the_one_thread_result():
    # A batch of one work item: the packed GEMMs split their columns over the threads.
    model = make_model(torch.float32)
    engine = Engine(model, backend="cpu")
    seqs, ids = batch(1, 9, heavy_padding=False), torch.tensor([35])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine.score(seqs, ids)
        torch.set_num_threads(2)
        two = engine.score(seqs, ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert relative_error(one, reference(model, seqs, ids)) < 1e-4


def test_packed_weights_follow_in_place_updates():
    model = make_model(torch.float32, space=ODD_SPACE)
    engine = Engine(model, backend="cpu")
    seqs, ids = batch(6, 4), torch.tensor([0, 5, 11, 3, 11, 8])
    engine.score(seqs, ids)  # packs
    first = list(engine._impl.packed())
    with torch.no_grad():
        model.supernet.blocks[0].ffn.fc1.weight.mul_(-0.5)
        model.supernet.in_proj.weight[:3] += 1.0
    got = engine.score(seqs, ids)
    assert relative_error(got, reference(model, seqs, ids)) < 2e-6
    again = engine._impl.packed()
    changed = [i for i, (a, b) in enumerate(zip(first, again, strict=True)) if a is not b]
    assert changed == [0, 5]  # in_proj and block 0's fc1 re-packed, nothing else


def test_float64_and_inference_tensor_weights_are_not_packed():
    assert Engine(make_model(torch.float64), backend="cpu")._impl.packed() == []
    with torch.inference_mode():
        model = make_model(torch.float32).requires_grad_(False)
        model = type(model).from_arch(model.arch).eval()  # parameters made in inference mode
        model.load_state_dict(make_model(torch.float32).state_dict())
    engine = Engine(model, backend="cpu")
    assert engine._impl.packed() == []
    seqs, ids = batch(5, 6), torch.tensor([0, 35, 20, 20, 9])
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 2e-6


def test_pack_panels_layout_and_checks():
    weight = torch.randn(37, 11)
    got = torch.ops.canet.pack_panels(weight, 5, 30)
    padded = torch.zeros(32, 11)
    padded[:30] = weight[5:35]  # rows 5..34, zero-padded to whole panels of 16 rows
    want = padded.view(2, 16, 11).permute(0, 2, 1)  # [panel, k, lane] = row 16 panel + lane
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match=r"rows \[30, 40\) must lie inside"):
        torch.ops.canet.pack_panels(weight, 30, 10)
    with pytest.raises(RuntimeError, match="must be a CPU float32 2-D tensor"):
        torch.ops.canet.pack_panels(weight.double(), 0, 4)


def test_routed_scores_checks_packed_weights():
    model = make_model(torch.float32, space=ODD_SPACE)
    engine = Engine(model, backend="cpu")
    seqs, ids = batch(3, 7), torch.tensor([0, 1, 2])
    args = op_args(engine, seqs, ids)
    packed = list(engine._impl.packed())
    with pytest.raises(RuntimeError, match=r"packed must be empty or hold 1 \+ 6 \* max_depth"):
        routed(*args, 0, packed[:-1])
    packed[2] = packed[2][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=r"packed\[2\] \(k\) must have shape"):
        routed(*args, 0, packed)


def test_without_residual_scaling():
    torch.manual_seed(0)
    from canet import CANet

    model = CANet(NUM_ITEMS, MAX_LEN, residual_scaling=False).double().eval()
    engine = Engine(model, backend="cpu")
    seqs, ids = batch(8, 3), torch.arange(8) * 5
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 1e-10


# -- last hidden states and the fused recommend -----------------------------------------------
@pytest.mark.parametrize("space", [None, RoutingSpace(depths=(1, 3), hidden=(8, 24), emb=(4, 12))])
def test_last_hidden_matches_model(space):
    # Input order, each user's first h columns equal to Supernet.last_hidden of its config,
    # zeros after them; in the default space and an odd one (depth 1: last-only from the start).
    model = make_model(torch.float64, space=space)
    engine = Engine(model, backend="cpu")
    n = len(model.space)
    seqs = batch(2 * n + 3, seed=21)
    ids = torch.randint(0, n, (seqs.shape[0],), generator=torch.Generator().manual_seed(5))
    got = engine._impl.last_hidden(seqs, plan(ids, engine._impl.table))
    assert got.shape == (seqs.shape[0], model.space.max_hidden)
    with torch.no_grad():
        for u, config_id in enumerate(ids.tolist()):
            config = model.space.configs[config_id]
            want = model.supernet.last_hidden(seqs[u : u + 1], config)[0]
            torch.testing.assert_close(got[u, : config.hidden], want, rtol=1e-11, atol=1e-12)
            assert not got[u, config.hidden :].any()


def test_routed_last_hidden_checks_like_routed_scores(engine64):
    args = op_args(engine64, batch(4, seed=1), torch.tensor([0, 35, 3, 3]))
    args[1] = torch.zeros_like(args[1])
    with pytest.raises(RuntimeError, match="canet::routed_last_hidden: order must be a perm"):
        torch.ops.canet.routed_last_hidden(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_recommend_equals_dense(model64, dtype, monkeypatch):
    # The fused path (routed_last_hidden + score_topk) against the engine's dense path (scores,
    # scatter, topk), with history and extra exclusions, over many users and every config.
    model = model64 if dtype == torch.float64 else make_model(torch.float32)
    engine = Engine(model, backend="cpu")
    seqs = batch(80, seed=22)
    ids = torch.arange(80) % 36
    rows = torch.tensor([79, 3, 3, 0, 40, 3])
    items = torch.tensor([1, 2, 61, 7, 7, 2])  # a repeated pair, and rows out of order
    assert engine._fused_top_k(10, seqs, (rows, items))
    fused = engine.recommend(seqs, k=10, config_ids=ids, exclude=(rows, items))
    monkeypatch.setattr(engine, "_fused_top_k", lambda *args: False)
    dense = engine.recommend(seqs, k=10, config_ids=ids, exclude=(rows, items))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused[1], dense[1], rtol=tol, atol=tol)
    if dtype == torch.float64:  # no ties among random float64 scores
        assert torch.equal(fused[0], dense[0])
    for row, item in zip(rows.tolist(), items.tolist(), strict=True):
        assert item not in fused[0][row].tolist()


def test_fused_recommend_drops_minus_inf_scores_like_dense(monkeypatch):
    # Items banned through a -inf bias are no candidates on either path: id -1, score -inf.
    model = make_model(torch.float32)
    with torch.no_grad():
        model.supernet.out.bias[4:] = float("-inf")  # only items 1, 2, 3 can be recommended
    engine = Engine(model, backend="cpu")
    seqs = torch.tensor([[0] * (MAX_LEN - 1) + [2], [0] * (MAX_LEN - 1) + [9]])
    fused = engine.recommend(seqs, k=5)
    monkeypatch.setattr(engine, "_fused_top_k", lambda *args: False)
    dense = engine.recommend(seqs, k=5)
    for ids, values in (fused, dense):
        assert sorted(ids[0, :2].tolist()) == [1, 3] and ids[0, 2:].eq(-1).all()
        assert sorted(ids[1, :3].tolist()) == [1, 2, 3] and ids[1, 3:].eq(-1).all()
        assert torch.isneginf(values[0, 2:]).all() and torch.isneginf(values[1, 3:]).all()
    torch.testing.assert_close(fused[1], dense[1])


def test_recommend_takes_the_dense_path_when_fusing_cannot_run(model64, monkeypatch):
    engine = Engine(model64, backend="cpu", max_score_elements=64 * (NUM_ITEMS + 1))
    seqs = batch(6, seed=23)
    assert engine._fused_top_k(10, seqs, None)
    # Exclusions wider than max_score_elements allows: one user with many pairs.
    rows = torch.zeros(NUM_ITEMS * 64, dtype=torch.long)
    items = torch.arange(NUM_ITEMS * 64) % NUM_ITEMS + 1
    assert not engine._fused_top_k(10, seqs, (rows, items))
    # An extension built before routed_last_hidden existed (a pull without a rebuild).
    real = _ext.has_kernel
    stale = lambda op, dev: op != "routed_last_hidden" and real(op, dev)  # noqa: E731
    monkeypatch.setattr(_ext, "has_kernel", stale)
    assert not engine._fused_top_k(10, seqs, None)
    ids, _ = engine.recommend(seqs, k=10, exclude=(rows, items))
    assert ids[0].eq(-1).all() and ids[1:].ge(1).all()


def test_ops_accept_parameters_on_several_threads():
    # The ops called with the model's Parameters (requires_grad), not state_dict tensors: no
    # autograd error on the worker threads, in grad mode or not, and the same results.
    model = make_model(torch.float32)
    engine = Engine(model, backend="cpu")
    impl = engine._impl
    by_ptr = {p.data_ptr(): p for p in model.parameters()}
    params = [by_ptr.get(w.data_ptr(), w) for w in impl.weights]
    router = [by_ptr.get(w.data_ptr(), w) for w in impl.router_weights]
    assert sum(p.requires_grad for p in params) > 100
    seqs = batch(300, seed=24)
    p = plan(torch.randint(0, 36, (300,), generator=torch.Generator().manual_seed(6)), impl.table)
    args = (seqs, p.order, p.group_config, p.group_offsets, impl.table)
    ops = (routed, torch.ops.canet.routed_last_hidden)
    want = [op(*args, impl.weights, impl.heads) for op in ops]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got = [op(*args, params, impl.heads) for op in ops]
                logits = torch.ops.canet.router_logits(seqs, router, impl.router_heads)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            torch.testing.assert_close(logits, impl.router_logits(seqs), rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


def test_exclusions_table():
    from canet.engine import _exclusions

    seqs = torch.tensor([[0, 4, 5], [1, 2, 3], [0, 0, 6]])
    rows, items = torch.tensor([2, 0, 2]), torch.tensor([9, 8, 7])
    assert _exclusions(seqs, False, None) is None
    assert torch.equal(_exclusions(seqs, True, None), seqs)
    want_extra = torch.tensor([[8, 0], [0, 0], [9, 7]])
    assert torch.equal(_exclusions(seqs, False, (rows, items)), want_extra)
    assert torch.equal(
        _exclusions(seqs, True, (rows, items)), torch.cat([seqs, want_extra], dim=1)
    )
    empty = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert _exclusions(seqs, False, empty) is None


# -- the ops' own boundary checks ------------------------------------------------------------
def _bad_cases():
    def replace(i, value):
        def edit(args):
            args[i] = value(args[i])

        return edit

    def weight(i, value):
        def edit(args):
            args[5][i] = value(args[5][i])

        return edit

    return {
        "seqs dtype": (replace(0, lambda s: s.int()), "seqs must be int64"),
        "seqs rank": (replace(0, lambda s: s[0]), "seqs must be 2-D"),
        "seqs length": (replace(0, lambda s: s[:, 1:]), r"pos_emb.weight\) must have shape"),
        "item id": (replace(0, lambda s: s.index_fill(1, torch.tensor([2]), 999)),
                    r"item ids must be in \[0, 61\]"),
        "last padding": (replace(0, lambda s: s.index_fill(1, torch.tensor([MAX_LEN - 1]), 0)),
                         "must end with a real item"),
        "order length": (replace(1, lambda o: o[:-1]), r"order must be a CPU int64 \[6\]"),
        "order not a permutation": (replace(1, lambda o: torch.zeros_like(o)),
                                    "order must be a permutation"),
        "offsets": (replace(3, lambda g: g.flip(0)), "group_offsets must run from 0 to B"),
        "group config": (replace(2, lambda g: g + 100), "is not a config id"),
        "table": (replace(4, lambda t: t[:, :2]), r"config_table must be a CPU int64 \[C, 3\]"),
        "weight count": (replace(5, lambda w: w[:-1]), "weights must hold 6 \\+ 14"),
        "weight dtype": (weight(7, lambda t: t.float()), "must have dtype Double"),
        "weight shape": (
            weight(4, lambda t: t[:-1]), r"blocks.0.attn.qkv.weight\) must have shape"
        ),
        "weight strided": (weight(2, lambda t: t.t().contiguous().t()), "must be contiguous"),
        "heads": (replace(6, lambda h: 5), "divisible by heads=5"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_routed_scores_rejects_bad_input(engine64, case):
    edit, message = _bad_cases()[case]
    args = op_args(engine64, batch(6, seed=1), torch.tensor([0, 35, 3, 3, 20, 1]))
    assert routed(*args).shape == (6, NUM_ITEMS + 1)  # the unedited call works
    edit(args)
    with pytest.raises(RuntimeError, match=message):
        routed(*args)


def test_routed_scores_rejects_bad_block_users_and_device(engine64):
    args = op_args(engine64, batch(3, seed=1), torch.tensor([0, 35, 3]))
    with pytest.raises(RuntimeError, match="block_users must be >= 0"):
        routed(*args, -1)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((RuntimeError, NotImplementedError)):
        routed(*meta)


def test_router_logits_rejects_bad_input(engine64):
    weights = list(engine64._impl.router_weights)
    seqs = batch(3, seed=1)
    with pytest.raises(RuntimeError, match="weights must hold 18 tensors"):
        torch.ops.canet.router_logits(seqs, weights[:-1], 4)
    with pytest.raises(RuntimeError, match="divisible by heads=3"):
        torch.ops.canet.router_logits(seqs, weights, 3)
    with pytest.raises(RuntimeError, match=r"head.bias\) must have shape \[36\]"):
        torch.ops.canet.router_logits(seqs, weights[:-1] + [weights[-1][:-1]], 4)
    with pytest.raises(RuntimeError, match="seqs must be int64"):
        torch.ops.canet.router_logits(seqs.float(), weights, 4)


def test_requirements_say_why_and_how():
    from canet.backends import cpu_backend

    assert cpu_backend.Backend.not_supported_reasons(torch.device("cpu")) == []
    (why,) = cpu_backend.Backend.not_supported_reasons(torch.device("meta"))
    assert "CPU tensors only" in why and "meta" in why
    # One refusal type whatever the backend: the engine's, a CanetError.
    model = make_model(torch.float32)
    meta = {k: v.to("meta") for k, v in model.state_dict().items()}
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        cpu_backend.Backend(model.arch, meta, torch.device("meta"))
    with pytest.raises(BackendUnavailableError, match="float32, float64, not float16"):
        cpu_backend.Backend(
            model.arch, {k: v.half() for k, v in model.state_dict().items()}, torch.device("cpu")
        )
