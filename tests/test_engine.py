"""canet.Engine against the PyTorch reference, for every backend this machine can run."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import (  # tests/ is on sys.path (rootdir conftest)
    MAX_LEN,
    NUM_ITEMS,
    assert_rounding_like_pytorch,
    batch,
    check_against_reference,
    make_model,
    reference,
    relative_error,
)

import canet
from canet import Engine, RoutingSpace, backends
from canet.backends import BackendUnavailableError

AVAILABLE = [name for name, why in backends.availability("cpu").items() if why is None]


MIXES = {
    "random": lambda b, g: torch.randint(0, 36, (b,), generator=g),
    "one_config": lambda b, g: torch.full((b,), 22),
    "smallest": lambda b, g: torch.zeros(b, dtype=torch.long),
    "largest": lambda b, g: torch.full((b,), 35),
    "two_extremes": lambda b, g: torch.randint(0, 2, (b,), generator=g) * 35,
}


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("size", [1, 7, 36])
def test_score_equals_model_score(backend, dtype, mix, size):
    model = make_model(dtype)
    engine = Engine(model, backend=backend)
    seqs = batch(size, seed=size)
    ids = MIXES[mix](size, torch.Generator().manual_seed(size + 1))
    got = engine.score(seqs, ids)
    assert got.dtype == dtype and got.shape == (size, NUM_ITEMS + 1)
    assert torch.isneginf(got[:, 0]).all()
    if dtype == torch.float64:
        assert relative_error(got, reference(model, seqs, ids)) < 1e-10
    else:
        check_against_reference(got, model, seqs, ids)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_all_36_configs_at_once_and_router_decides(backend):
    model = make_model()
    engine = Engine(model, backend=backend)
    seqs = batch(72, seed=5)
    ids = torch.randperm(72, generator=torch.Generator().manual_seed(0)) % 36
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 1e-10
    assert sum(1 for n in engine.last_plan.histogram if n) == 36
    routed = engine.score(seqs)
    assert torch.equal(engine.route(seqs), model.route(seqs))
    assert relative_error(routed, reference(model, seqs)) < 1e-10


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("max_len", [1, 2, 13])
def test_odd_sequence_lengths(backend, max_len):
    model = make_model(max_len=max_len)
    engine = Engine(model, backend=backend)
    seqs = batch(9, seed=max_len, max_len=max_len)
    ids = torch.arange(9) * 4
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 1e-10


@pytest.mark.parametrize("backend", AVAILABLE)
def test_other_routing_space(backend):
    space = RoutingSpace(depths=(1, 3), hidden=(8, 24), emb=(4, 12), heads=4)
    model = make_model(space=space)
    engine = Engine(model, backend=backend)
    seqs = batch(10, seed=3)
    ids = torch.arange(10) % len(space)
    assert relative_error(engine.score(seqs, ids), reference(model, seqs, ids)) < 1e-10


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("exclude_history", [True, False])
def test_recommend_matches_topk_of_masked_scores(backend, exclude_history):
    model = make_model(torch.float32)
    engine = Engine(model, backend=backend, max_score_elements=3 * (NUM_ITEMS + 1))
    seqs = batch(10, seed=4)
    ids, values = engine.recommend(seqs, k=7, exclude_history=exclude_history)
    routed = model.route(seqs)

    def top_k(m):
        scores = reference(m, seqs, routed)
        if exclude_history:
            scores = scores.scatter(1, seqs, float("-inf"))
        return scores.topk(7, dim=-1)

    assert_rounding_like_pytorch(
        values, model, lambda m: top_k(m).values,
        baseline_compute=lambda m: reference(m, seqs, routed)[:, 1:],
    )
    want = top_k(model)
    # Ids must agree wherever the scores are not tied.
    assert (ids == want.indices).float().mean() > 0.95
    assert (ids != 0).all()
    if exclude_history:
        assert not (ids[:, :, None] == seqs[:, None, :]).any()
    assert engine.last_plan.num_users == 10


@pytest.mark.parametrize("backend", AVAILABLE)
def test_recommend_with_fewer_candidates_than_k_pads_with_minus_one(backend):
    model = make_model(torch.float32, num_items=6, max_len=5)
    engine = Engine(model, backend=backend)
    seqs = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 6, 5, 4], [0, 0, 0, 0, 2]])
    ids, values = engine.recommend(seqs, k=4)
    assert ids[0].tolist() == [6, -1, -1, -1]  # only item 6 is not in the history
    assert torch.isneginf(values[0, 1:]).all() and torch.isfinite(values[0, 0])
    assert sorted(ids[1, :3].tolist()) == [1, 2, 3] and ids[1, 3] == -1
    assert torch.isfinite(values[2]).all() and 2 not in ids[2].tolist()
    assert not ((ids[:, :, None] == seqs[:, None, :]) & (ids[:, :, None] > 0)).any()


def test_recommend_bad_k():
    engine = Engine(make_model(torch.float32), backend="torch")
    for k in (0, NUM_ITEMS + 1, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            engine.recommend(batch(2, 0), k=k)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_last_plan_reports_histogram_groups_and_flops(backend):
    model = make_model(torch.float32)
    engine = Engine(model, backend=backend)
    ids = torch.tensor([35, 0, 0, 17, 35, 3, 0])
    engine.score(batch(7, 1), ids)
    plan = engine.last_plan
    assert plan.histogram[0] == 3 and plan.histogram[35] == 2 and sum(plan.histogram) == 7
    assert [g.config_id for g in plan.groups] == [35, 3, 17, 0]  # depth desc, then hidden
    assert [g.size for g in plan.groups] == [2, 1, 1, 3]
    assert plan.layer_active == [7, 7, 4, 4, 2, 2, 2, 2]
    flops = [canet.flops(c, MAX_LEN, NUM_ITEMS) for c in model.space.configs]
    assert plan.flops == sum(flops[i] for i in ids.tolist())
    assert plan.flops_largest == 7 * flops[35]
    assert plan.flops_router == 0
    assert 0 < plan.flops_fraction < 1
    assert torch.equal(ids[plan.order][[0, 1]], torch.tensor([35, 35]))


def test_engine_holds_no_second_copy_of_the_weights():
    model = make_model(torch.float32)
    engine = Engine(model, backend="torch")
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in ptrs for p in engine._impl.model.parameters())
    # An in-place update of the model is seen by the engine.
    seqs, ids = batch(3, 2), torch.tensor([1, 20, 35])
    before = engine.score(seqs, ids)
    with torch.no_grad():
        model.supernet.out.bias += 1.0
    torch.testing.assert_close(engine.score(seqs, ids)[:, 1:], before[:, 1:] + 1.0)


def test_auto_falls_back_and_explicit_backends_refuse_an_unsupported_dtype():
    import warnings

    model = make_model(torch.float32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        engine = Engine(model, dtype=torch.bfloat16)
    assert engine.backend == "torch"
    seqs, ids = batch(4, 5), torch.tensor([0, 9, 22, 35])
    got = engine.score(seqs, ids).float()
    assert relative_error(got, reference(model, seqs, ids)) < 0.1  # bfloat16: ~3 digits
    for name, why in backends.availability("cpu", torch.bfloat16).items():
        if name != "torch":
            assert why is not None
    if "cpu" in AVAILABLE:
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            Engine(model, backend="cpu", dtype=torch.bfloat16)


def test_engine_dtype_conversion():
    model = make_model(torch.float64)
    engine = Engine(model, backend="torch", dtype=torch.float32)
    seqs, ids = batch(5, 3), torch.arange(5) * 7
    check_against_reference(engine.score(seqs, ids), model, seqs, ids, torch.float32)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize(
    "make_seqs, message",
    [
        (lambda s: s.float(), "dtype"),
        (lambda s: s[:, 1:], "length"),
        (lambda s: s[:0], "empty"),
        (lambda s: s.index_fill(1, torch.tensor([3]), NUM_ITEMS + 1), "item ids"),
        (lambda s: s.index_fill(1, torch.tensor([MAX_LEN - 1]), 0), "padding"),
    ],
)
def test_bad_input_raises_value_error(backend, make_seqs, message):
    engine = Engine(make_model(torch.float32), backend=backend)
    bad = make_seqs(batch(3, 1))
    calls = (lambda: engine.score(bad), lambda: engine.recommend(bad), lambda: engine.route(bad))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_bad_config_ids_raise_value_error(backend):
    engine = Engine(make_model(torch.float32), backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 35\]"):
        engine.score(batch(3, 1), torch.tensor([0, 36, 2]))
    with pytest.raises(ValueError, match="shape"):
        engine.score(batch(3, 1), torch.tensor([0, 1]))


def test_unknown_and_unavailable_backends_say_why():
    model = make_model(torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        Engine(model, backend="tpu")
    reasons = backends.availability("cpu")
    assert reasons["torch"] is None
    for name, why in reasons.items():
        if why is not None:
            with pytest.raises(BackendUnavailableError, match=name) as err:
                Engine(model, backend=name)
            assert why in str(err.value)
    assert reasons["triton"] is not None  # never on a CPU; the reason names what is missing
    with pytest.raises(ValueError, match="unknown backend"):  # not implemented: not offered
        Engine(model, backend="cuda")


def test_auto_picks_a_working_backend():
    import warnings

    model = make_model(torch.float32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        engine = Engine(model)
    assert engine.backend in AVAILABLE
    if backends.availability("cpu")["cpu"] is None:
        assert engine.backend == "cpu"


def test_capture_needs_a_backend_that_plans_on_the_device():
    engine = Engine(make_model(torch.float32), backend="torch")
    with pytest.raises(BackendUnavailableError, match="capture needs"):
        engine.capture(8)


def test_last_plan_is_none_before_the_first_batch_and_follows_each_batch():
    engine = Engine(make_model(torch.float32), backend="torch")
    assert engine.last_plan is None
    engine.score(batch(3, 1), torch.tensor([0, 0, 35]))
    assert engine.last_plan.histogram[35] == 1
    engine.score(batch(2, 1), torch.tensor([4, 4]))
    assert engine.last_plan.histogram[4] == 2 and engine.last_plan.num_users == 2


@pytest.mark.parametrize("backend", AVAILABLE)
def test_recommend_with_given_configs_and_extra_exclusions(backend):
    model = make_model(torch.float32)
    engine = Engine(model, backend=backend, max_score_elements=2 * (NUM_ITEMS + 1))
    seqs = batch(5, 8)
    config_ids = torch.tensor([0, 35, 7, 7, 20])
    rows = torch.tensor([4, 0, 3, 0])
    items = torch.tensor([60, 5, 1, 9])
    ids, values = engine.recommend(seqs, k=6, config_ids=config_ids, exclude=(rows, items))

    def top_k(m):
        scores = reference(m, seqs, config_ids).scatter(1, seqs, float("-inf"))
        scores[rows, items] = float("-inf")
        return scores.topk(6, dim=-1)

    assert_rounding_like_pytorch(
        values, model, lambda m: top_k(m).values,
        baseline_compute=lambda m: reference(m, seqs, config_ids)[:, 1:],
    )
    assert torch.equal(engine.last_config_ids, config_ids)
    assert engine.last_plan.flops_router == 0
    for row, item in zip(rows.tolist(), items.tolist(), strict=True):
        assert item not in ids[row].tolist()
    with pytest.raises(ValueError, match="exclude"):
        engine.recommend(seqs, k=3, exclude=(torch.tensor([5]), torch.tensor([1])))


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_capability_flags_promise_their_methods(name):
    # The engine reads the flags, never probes methods: each flag must match what the class
    # implements (the base class's versions refuse).
    cls = backends.backend_class(name)
    base = backends.Backend
    promised = {
        "PLANS_ON_DEVICE": ("scores_from_ids",),
        "CAPTURABLE": ("capture",),
        "LAST_HIDDEN": ("last_hidden", "output_layer"),
    }
    for flag, methods in promised.items():
        assert getattr(cls, flag) is all(getattr(cls, m) is not getattr(base, m) for m in methods)
    assert cls.NAME == name and cls.DTYPES


def test_engine_follows_the_flags_and_missing_capabilities_say_which(monkeypatch):
    engine = Engine(make_model(torch.float32), backend="torch")
    seqs, ids = batch(3, 1), torch.tensor([0, 4, 35])
    with pytest.raises(BackendUnavailableError, match="the torch backend has no last_hidden"):
        engine._impl.last_hidden(seqs, None)
    sentinel = torch.zeros(3, NUM_ITEMS + 1)
    monkeypatch.setattr(engine._impl, "PLANS_ON_DEVICE", True)
    monkeypatch.setattr(engine._impl, "scores_from_ids", lambda s, i: sentinel)
    assert engine.score(seqs, ids) is sentinel


def test_a_model_on_the_meta_device_is_refused_clearly():
    # Before: backends failed deep inside on shape-only tensors.
    model = make_model(torch.float32).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        Engine(model, backend="torch")


@pytest.mark.parametrize(
    ("device", "error", "message"),
    [
        ("nonsense", ValueError, "device must be 'cpu', 'cuda' or 'cuda:N', got 'nonsense'"),
        ("meta", ValueError, "device 'meta' holds tensor shapes only"),
        ("mps", ValueError, "canet runs on CPUs and CUDA GPUs"),
        ("cuda:x", ValueError, "got 'cuda:x'"),
    ],
)
def test_resolve_device_refuses_bad_devices(device, error, message):
    with pytest.raises(error, match=message):
        canet.engine.resolve_device(device)
    assert canet.engine.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_says_cuda_is_missing():
    expected = "CUDA is not available" + (
        re.escape(f" in this torch build ({torch.__version__})")
        if torch.version.cuda is None else "")
    with pytest.raises(BackendUnavailableError, match=expected):
        canet.engine.resolve_device("cuda")
    # A saved config from a GPU machine still parses (only the syntax is checked).
    assert canet.engine.resolve_device("cuda:1", check_available=False).index == 1


def test_engine_dtype_by_name():
    # Before: Engine(m, dtype="float32") raised AttributeError ('str' has no is_floating_point).
    model = make_model(torch.float64)
    assert Engine(model, backend="torch", dtype="float32").dtype == torch.float32
    assert Engine(model, backend="torch", dtype="torch.float64").dtype == torch.float64
    for bad in ("nonsense", "Size", 32):
        with pytest.raises(ValueError, match="dtype must be a torch.dtype or its name"):
            Engine(model, backend="torch", dtype=bad)
    with pytest.raises(ValueError, match="floating-point dtype, got torch.int64"):
        Engine(model, backend="torch", dtype="int64")
