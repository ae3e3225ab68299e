"""canet.ops.plan: native op vs the pure-PyTorch reference, and the plan's invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from canet import _ext
from canet.ops import Plan, plan, plan_reference
from canet.space import DEFAULT_DEPTHS, DEFAULT_EMB, DEFAULT_HIDDEN

DEPTHS, HIDDEN, EMB = DEFAULT_DEPTHS, DEFAULT_HIDDEN, DEFAULT_EMB
# The paper's default space, hidden-major, then depth, then emb:
# config 0 = (2, 64, 64), config 35 = (8, 128, 128).
TABLE = torch.tensor([(d, h, e) for h in HIDDEN for d in DEPTHS for e in EMB], dtype=torch.int64)
C = TABLE.shape[0]

native = pytest.mark.skipif(
    not _ext.has_kernel("plan", "cpu"), reason=f"canet._C not loaded: {_ext.reason()}"
)


def native_plan(ids: torch.Tensor, table: torch.Tensor) -> Plan:
    return Plan(*torch.ops.canet.plan(ids, table))


def group_key(table: torch.Tensor, c: int) -> tuple[int, int, int, int]:
    d, h, e = (int(v) for v in table[c])
    return (-d, h, e, c)


def check_invariants(ids: torch.Tensor, table: torch.Tensor, p: Plan) -> None:
    batch, num_configs = ids.shape[0], table.shape[0]
    max_depth = max(int(table[:, 0].max()), 0)
    for t in p:
        assert t.dtype == torch.int64 and t.device == ids.device
    assert p.order.shape == (batch,) and p.inverse.shape == (batch,)
    assert p.group_config.shape == (num_configs,)
    assert p.group_offsets.shape == (num_configs + 1,)
    assert p.layer_active.shape == (max_depth,)

    assert torch.equal(torch.sort(p.order).values, torch.arange(batch))
    assert torch.equal(p.inverse[p.order], torch.arange(batch))
    assert torch.equal(p.order[p.inverse], torch.arange(batch))

    assert sorted(p.group_config.tolist()) == list(range(num_configs))
    keys = [group_key(table, c) for c in p.group_config.tolist()]
    assert keys == sorted(keys)

    sizes = torch.bincount(ids, minlength=num_configs)[p.group_config]
    assert int(p.group_offsets[0]) == 0
    assert torch.equal(p.group_offsets[1:], torch.cumsum(sizes, 0))
    for g, c in enumerate(p.group_config.tolist()):
        rows = p.order[p.group_offsets[g] : p.group_offsets[g + 1]]
        assert bool((ids[rows] == c).all()), "a user sits outside the group of its config"
        assert bool((rows[1:] > rows[:-1]).all()), "group not in increasing user index"

    user_depth = table[ids, 0]
    sorted_depth = user_depth[p.order]
    for i in range(max_depth):
        n = int(p.layer_active[i])
        assert n == int((user_depth > i).sum())
        assert bool((sorted_depth[:n] > i).all()) and bool((sorted_depth[n:] <= i).all())


def assert_same(a: Plan, b: Plan) -> None:
    for name, x, y in zip(Plan._fields, a, b, strict=True):
        assert torch.equal(x, y), name


ids_strategy = st.lists(st.integers(0, C - 1), max_size=300).map(
    lambda xs: torch.tensor(xs, dtype=torch.int64)
)


@given(ids=ids_strategy)
def test_reference_invariants(ids: torch.Tensor) -> None:
    check_invariants(ids, TABLE, plan_reference(ids, TABLE))


@native
@given(ids=ids_strategy)
def test_native_matches_reference(ids: torch.Tensor) -> None:
    p = native_plan(ids, TABLE)
    check_invariants(ids, TABLE, p)
    assert_same(p, plan_reference(ids, TABLE))


@given(
    table=st.lists(
        st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=12
    ),
    data=st.data(),
)
def test_random_tables_with_key_ties(table: list, data: st.DataObject) -> None:
    t = torch.tensor(table, dtype=torch.int64)
    ids = torch.tensor(
        data.draw(st.lists(st.integers(0, len(table) - 1), max_size=100)), dtype=torch.int64
    )
    p = plan(ids, t)
    check_invariants(ids, t, p)
    assert_same(p, plan_reference(ids, t))


@pytest.mark.parametrize("impl", ["plan", "reference", "native"])
@pytest.mark.parametrize(
    "ids",
    [
        [],
        [17],
        [5] * 40,
        list(range(C)),
        list(reversed(range(C))) * 3,
    ],
    ids=["B=0", "B=1", "one-config", "all-36", "all-36-reversed-x3"],
)
def test_edge_cases(impl: str, ids: list[int]) -> None:
    if impl == "native" and not _ext.has_kernel("plan", "cpu"):
        pytest.skip(f"canet._C not loaded: {_ext.reason()}")
    fn = {"plan": plan, "reference": plan_reference, "native": native_plan}[impl]
    t = torch.tensor(ids, dtype=torch.int64)
    p = fn(t, TABLE)
    check_invariants(t, TABLE, p)
    assert_same(p, plan_reference(t, TABLE))
    assert_same(p, fn(t.clone(), TABLE.clone()))  # identical inputs, identical plans


def test_empty_batch_offsets_are_zero() -> None:
    p = plan(torch.empty(0, dtype=torch.int64), TABLE)
    assert p.order.numel() == 0 and p.inverse.numel() == 0
    assert bool((p.group_offsets == 0).all()) and bool((p.layer_active == 0).all())


def test_default_space_group_order() -> None:
    p = plan(torch.arange(C), TABLE)
    # Deepest first; within depth 8, hidden then emb ascending: configs 9, 10, 11 (hidden 64).
    assert p.group_config[:3].tolist() == [9, 10, 11]
    assert p.group_config[-1].item() == 26  # (2, 128, 128): shallowest, widest
    assert p.layer_active.tolist() == [36, 36, 27, 27, 18, 18, 9, 9]


def test_single_config_table() -> None:
    table = torch.tensor([[3, 64, 64]])
    ids = torch.zeros(5, dtype=torch.int64)
    p = plan(ids, table)
    check_invariants(ids, table, p)
    assert p.order.tolist() == [0, 1, 2, 3, 4]
    assert p.layer_active.tolist() == [5, 5, 5]


def test_plan_on_noncontiguous_input() -> None:
    ids = torch.arange(2 * C).remainder(C)[::2]
    p = plan(ids, TABLE.t().contiguous().t())
    check_invariants(ids, TABLE, p)


BAD = [
    (torch.tensor([0, 1], dtype=torch.int32), TABLE, "config_ids must be int64"),
    (torch.tensor([0, 1]), TABLE.float(), "config_table must be int64"),
    (torch.tensor([[0, 1]]), TABLE, r"config_ids must be 1-D \[B\]"),
    (torch.tensor([0, C]), TABLE, rf"config_ids must be in \[0, {C}\), got a value of {C}"),
    (torch.tensor([-1, 0]), TABLE, r"got a value of -1"),
    (torch.tensor([0]), TABLE[:, :2], r"config_table must be \[C, 3\]"),
    (torch.tensor([0]), TABLE[0], r"config_table must be \[C, 3\]"),
    (torch.tensor([0]), TABLE[:0], r"at least one config \(C >= 1\)"),
    (torch.tensor([0]), TABLE.to("meta"), "same device"),
]


@pytest.mark.parametrize("fn", [plan, plan_reference], ids=["plan", "reference"])
@pytest.mark.parametrize("ids,table,match", BAD)
def test_bad_input_raises_value_error(fn, ids, table, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        fn(ids, table)


@native
@pytest.mark.parametrize("ids,table,match", BAD[:-1])
def test_native_op_rejects_bad_input(ids, table, match) -> None:  # noqa: ANN001
    # The C++ boundary checks too (torch raises RuntimeError from TORCH_CHECK).
    with pytest.raises(RuntimeError, match="canet::plan"):
        native_plan(ids, table)


@pytest.mark.parametrize("fn", [plan, plan_reference], ids=["plan", "reference"])
def test_given_max_depth(fn, gen: torch.Generator) -> None:  # noqa: ANN001
    ids = torch.randint(0, C, (57,), generator=gen)
    assert_same(fn(ids, TABLE, max_depth=8), plan_reference(ids, TABLE))
    for wrong, match in ((7, "largest depth 8, got 7"), (9, "largest depth 8, got 9"),
                         (-1, "max_depth must be an int >= 0"), (True, "an int >= 0")):
        with pytest.raises(ValueError, match=match):
            fn(ids, TABLE, max_depth=wrong)


@native
def test_native_op_checks_max_depth(gen: torch.Generator) -> None:
    ids = torch.randint(0, C, (57,), generator=gen)
    assert_same(Plan(*torch.ops.canet.plan(ids, TABLE, 8)), plan_reference(ids, TABLE))
    assert_same(Plan(*torch.ops.canet.plan(ids, TABLE, -1)), plan_reference(ids, TABLE))
    with pytest.raises(RuntimeError, match="largest depth 8"):
        torch.ops.canet.plan(ids, TABLE, 6)
    with pytest.raises(RuntimeError, match="max_depth must be -1"):
        torch.ops.canet.plan(ids, TABLE, -2)


def test_cuda_path_dispatch_is_consistent() -> None:
    # Without a CUDA kernel, plan() must still work on every device it is given via reference.
    assert isinstance(_ext.has_kernel("plan", "cuda"), bool)
    assert _ext.has_kernel("plan", "no-such-device") is False


@pytest.mark.gpu
def test_cuda_matches_cpu(gen: torch.Generator) -> None:
    for batch in (0, 1, 31, 32, 33, 511, 512, 513, 5000, 100_000):
        ids = torch.randint(0, C, (batch,), generator=gen)
        cpu = plan_reference(ids, TABLE)
        got = plan(ids.cuda(), TABLE.cuda())
        assert_same(Plan(*(t.cpu() for t in got)), cpu)
    # Ties, and max_depth read from a new table (no value given).
    small = torch.tensor([[3, 1, 1], [3, 1, 1], [1, 2, 2]])
    ids = torch.randint(0, 3, (1000,), generator=gen)
    got = plan(ids.cuda(), small.cuda())
    assert_same(Plan(*(t.cpu() for t in got)), plan_reference(ids, small))


@pytest.mark.gpu
def test_cuda_plan_with_max_depth_is_graph_capturable(gen: torch.Generator) -> None:
    # With max_depth given the op never reads the device back, so it can be recorded in a CUDA
    # graph; a replay with new ids in the same buffer must re-plan them. One eager call first,
    # as torch.cuda.graph's docs advise, so lazy module loading happens outside the capture.
    if not _ext.has_kernel("plan", "cuda"):
        pytest.skip(f"canet._C has no CUDA kernel for canet::plan: {_ext.reason()}")
    ids = torch.randint(0, C, (4096,), generator=gen).cuda()
    table = TABLE.cuda()
    torch.ops.canet.plan(ids, table, 8)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.canet.plan(ids, table, 8)
    for _ in range(2):
        fresh = torch.randint(0, C, (4096,), generator=gen)
        ids.copy_(fresh)
        graph.replay()
        assert_same(Plan(*(t.cpu() for t in captured)), plan_reference(fresh, TABLE))
