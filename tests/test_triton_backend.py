"""The whole Triton backend against the PyTorch model.

Interpreter tests build ``triton_backend.Backend`` directly on CPU tensors (it refuses CPU
devices unless TRITON_INTERPRET=1; ``backends.availability("cpu")["triton"]`` stays a reason, so
engines never pick it on a CPU). GPU tests add bfloat16, the Engine front-end, CUDA-graph
replay over three routing mixes and the launch count of one forward.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import batch, make_model  # tests/ is on sys.path (rootdir conftest)

from canet import Engine, RoutingSpace, backends, ops
from canet.backends import BackendUnavailableError, triton_backend

pytest.importorskip("triton")

SMALL = RoutingSpace(depths=(1, 3), hidden=(8, 48), emb=(8, 40), heads=4)  # odd sizes
NUM_ITEMS = 37


def make(space, dtype, max_len, device="cpu"):
    model = make_model(dtype, num_items=NUM_ITEMS, max_len=max_len, space=space).to(device)
    backend = triton_backend.Backend(model.arch, model.state_dict(), torch.device(device))
    return model, backend


def relative_error(got, want):
    return ((got[:, 1:].float() - want[:, 1:].float()).abs().max() / want[:, 1:].abs().max()).item()


def check_scores(model, backend, seqs, ids, tol):
    table = model.space.table(seqs.device)
    want = model.score(seqs, ids)
    for got in (
        backend.scores(seqs, ops.plan_reference(ids, table)),
        backend.scores_from_ids(seqs, ids),
    ):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.isneginf(got[:, 0]).all()
        assert torch.isfinite(got[:, 1:]).all()
        assert relative_error(got, want.float()) < tol


CASES = {
    # name: (space, batch, max_len, ids)
    "one_user": (SMALL, 1, 4, [3]),
    "max_len_1": (SMALL, 5, 1, [0, 7, 2, 7, 5]),
    "empty_groups": (SMALL, 4, 6, [6, 6, 1, 6]),
    "odd_mix": (SMALL, 9, 7, [0, 1, 2, 3, 4, 5, 6, 7, 4]),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_match_model(dtype, tol, case):
    space, size, max_len, ids = CASES[case]
    model, backend = make(space, torch.float32, max_len)
    seqs = batch(size, seed=size + max_len, max_len=max_len, num_items=NUM_ITEMS)
    ids = torch.tensor(ids)
    if dtype == torch.float32:
        check_scores(model, backend, seqs, ids, tol)
    else:  # compare against the fp32 model: the kernels accumulate in fp32
        half = triton_backend.Backend(
            model.arch, {k: v.to(dtype) if v.is_floating_point() else v
                         for k, v in model.state_dict().items()}, torch.device("cpu"),
        )
        got = half.scores_from_ids(seqs, ids)
        assert got.dtype == dtype
        assert relative_error(got, model.score(seqs, ids)) < tol


@pytest.mark.interpreter
def test_padding_inside_sequences_is_never_attended():
    """Zeros between real items (not only on the left) are keys to skip, as in the model."""
    model, backend = make(SMALL, torch.float32, 7)
    seqs = batch(6, seed=11, max_len=7, num_items=NUM_ITEMS, heavy_padding=False)
    seqs[0, 2] = 0
    seqs[1, 1:5] = 0
    seqs[2, :6:2] = 0
    seqs[3, 5] = 0
    check_scores(model, backend, seqs, torch.tensor([0, 7, 3, 4, 6, 1]), 1e-4)


@pytest.mark.interpreter
def test_default_space():
    """The real space (depth 8, widths 128): 12 users over 11 configs of every depth and width
    (all 36 at once is left to the GPU tests: the interpreter needs minutes for it)."""
    model, backend = make(RoutingSpace(), torch.float32, 2)
    seqs = batch(12, seed=7, max_len=2, num_items=NUM_ITEMS)
    ids = torch.tensor([0, 5, 13, 22, 30, 35, 17, 9, 26, 35, 1, 33])
    want = model.score(seqs, ids)
    got = backend.scores_from_ids(seqs, ids)
    assert torch.isneginf(got[:, 0]).all() and relative_error(got, want) < 1e-4
    assert torch.equal(backend.route(seqs), model.route(seqs))


def test_cpu_is_never_offered_and_refused_without_the_interpreter(monkeypatch):
    assert backends.availability("cpu")["triton"] is not None
    assert "CUDA" in triton_backend.requirements(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_model(torch.float32, num_items=NUM_ITEMS, max_len=3, space=SMALL)
    with pytest.raises(BackendUnavailableError, match="triton"):
        triton_backend.Backend(model.arch, model.state_dict(), torch.device("cpu"))


# -- GPU -------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def gpu_batch(size, max_len, seed):
    return batch(size, seed=seed, max_len=max_len, num_items=NUM_ITEMS).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size, max_len", [(1, 50), (300, 50), (77, 1), (129, 13), (72, 50)])
def test_gpu_scores_match_model(dtype, size, max_len):
    model = make_model(torch.float32, num_items=NUM_ITEMS, max_len=max_len).cuda()
    engine = Engine(model, backend="triton", dtype=dtype)
    seqs = gpu_batch(size, max_len, seed=size)
    ids = torch.randint(0, 36, (size,), generator=torch.Generator().manual_seed(size)).cuda()
    got = engine.score(seqs, ids)
    assert got.dtype == dtype and torch.isneginf(got[:, 0]).all()
    assert relative_error(got, model.score(seqs, ids)) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_replay_any_mix(dtype):
    size, max_len = 257, 50
    model = make_model(torch.float32, num_items=NUM_ITEMS, max_len=max_len).cuda()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    backend = triton_backend.Backend(model.arch, state, torch.device("cuda"))
    captured = backend.capture(size, routed=False)
    g = torch.Generator().manual_seed(0)
    mixes = [
        torch.randint(0, 36, (size,), generator=g),
        torch.full((size,), 35),
        torch.randint(0, 2, (size,), generator=g) * 35,
    ]
    for i, ids in enumerate(mixes):
        seqs = gpu_batch(size, max_len, seed=i)
        got = captured(seqs, ids.cuda()).clone()
        assert relative_error(got, model.score(seqs, ids.cuda())) < GPU_TOL[dtype]
    routed = backend.capture(size, routed=True)
    for i in range(3):
        seqs = gpu_batch(size, max_len, seed=10 + i)
        assert relative_error(routed(seqs), model.score(seqs)) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("mix", ["one_config", "all_36"])
def test_gpu_launch_count_of_one_forward(mix):
    size, max_len = 512, 50
    model = make_model(torch.float32, num_items=NUM_ITEMS, max_len=max_len).cuda()
    backend = triton_backend.Backend(model.arch, model.state_dict(), torch.device("cuda"))
    ids = torch.full((size,), 7) if mix == "one_config" else torch.arange(size) % 36
    ids, seqs = ids.cuda(), gpu_batch(size, max_len, seed=3)
    out = torch.empty(size, NUM_ITEMS + 1, device="cuda")
    backend.scores_from_ids(seqs, ids, out=out)  # compile outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        backend.scores_from_ids(seqs, ids, out=out)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(launches) <= 3 + 5 * model.space.max_depth, [e.name for e in launches]
