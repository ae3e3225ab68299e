"""The Triton kernels one by one against PyTorch references.

Interpreter tests (``TRITON_INTERPRET=1 pytest -m interpreter``) run every kernel on small
shapes: each output is a view inside a NaN-filled guard buffer, and the tests assert that the
guards stay NaN, that exactly the cells the kernel owns are written (the rest of the interior
stays NaN) and that the written cells match. A CPU test compiles each kernel to TTIR for sm_90
and checks that offsets into the large buffers are 64-bit. GPU tests repeat the kernel checks
on CUDA with float16/bfloat16.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from canet import RoutingSpace, ops
from canet.model import LN_EPS, allowed_keys, attend, merge_heads, split_heads

triton = pytest.importorskip("triton")

from canet.kernels import attention as k_attention  # noqa: E402
from canet.kernels import grouped_linear as k_linear  # noqa: E402
from canet.kernels import plan as k_plan  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Two spaces: sizes that are multiples of BLOCK_K (no K masks), and odd ones (masked K, head
# dims 2 and 12 padded to 16).
SPACES = {
    "even": RoutingSpace(depths=(1, 2, 3), hidden=(32, 64), emb=(32, 64), heads=4),
    "odd": RoutingSpace(depths=(1, 3), hidden=(8, 48), emb=(8, 40), heads=4),
}
GUARD = 37


def guarded(shape: tuple[int, ...], dtype: torch.dtype, device="cpu"):
    """(buffer, view): ``view`` of ``shape`` inside a NaN-filled 1-D buffer with GUARD cells on
    each side."""
    numel = math.prod(shape)
    buffer = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype, device=device)
    return buffer, buffer[GUARD : GUARD + numel].view(shape)


def assert_guards(buffer: torch.Tensor) -> None:
    assert torch.isnan(buffer[:GUARD]).all() and torch.isnan(buffer[-GUARD:]).all(), (
        "a kernel wrote outside its output"
    )


def assert_written_exactly(view: torch.Tensor, owned: torch.Tensor, want: torch.Tensor, tol):
    """Cells in ``owned`` are finite and close to ``want``; every other cell is still NaN."""
    got = view.float()
    assert torch.isfinite(got[owned]).all(), "an owned cell was not written"
    assert torch.isnan(got[~owned]).all(), "a cell outside the kernel's rows/columns was written"
    torch.testing.assert_close(got[owned], want.float()[owned], rtol=tol, atol=tol)


class Setup:
    """Random weights, a batch and its device plan for one space."""

    def __init__(self, space: RoutingSpace, ids: list[int], seq_len: int, dtype, device="cpu"):
        g = torch.Generator().manual_seed(len(ids) * 31 + seq_len)
        self.space, self.seq_len, self.dtype, self.device = space, seq_len, dtype, device
        self.batch = len(ids)
        self.ids = torch.tensor(ids, dtype=torch.int64)
        self.num_items = 23
        seqs = torch.randint(1, self.num_items + 1, (self.batch, seq_len), generator=g)
        lengths = torch.randint(1, seq_len + 1, (self.batch,), generator=g)
        seqs[torch.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]] = 0
        self.seqs = seqs
        table = space.table()
        self.plan = ops.plan_reference(self.ids, table)
        self.config_table = table.to(torch.int32)
        self.rank = torch.empty(len(space), dtype=torch.int32)
        self.rank[self.plan.group_config] = torch.arange(len(space), dtype=torch.int32)
        self.gen = g
        self.buffers = k_plan.PlanBuffers(
            self.batch, seq_len, len(space), space.max_depth, torch.device(device)
        )
        k_plan.build_plan(
            self.buffers, self.config_table.to(device), self.plan.group_config.to(device),
            config_ids=self.ids.to(device), config_rank=self.rank.to(device),
        )
        self.sorted_configs = [space.configs[int(c)] for c in self.ids[self.plan.order]]

    def randn(self, *shape, scale=0.5):
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.dtype).to(self.device)

    def common(self, k_source, n_source):
        return {
            "tiles": self.buffers.tiles,
            "config_table": self.config_table.to(self.device),
            "hidden_sizes": self.space.hidden,
            "emb_sizes": self.space.emb,
            "seq_len": self.seq_len,
            "token_capacity": self.buffers.token_capacity,
            "k_source": k_source,
            "n_source": n_source,
            "num_programs": 3,
        }

    def token_rows(self, user_row: int, layer: int | None) -> list[int]:
        """Token rows of sorted user ``user_row`` a dense launch of ``layer`` covers (None: all
        rows of every user, as the embedding)."""
        depth = self.sorted_configs[user_row].depth
        base = user_row * self.seq_len
        if layer is None or depth > layer + 1:
            return list(range(base, base + self.seq_len))
        if depth == layer + 1:
            return [base + self.seq_len - 1]
        return []


def tolerance(dtype):
    return 2e-5 if dtype == torch.float32 else 2e-2


ID_MIXES = {
    "one_user": [3],
    "odd_mix": [0, 5, 5, 2, 9, 11, 1, 5, 0, 7, 3],
    "empty_groups": [4, 4, 4],
}


def pick_ids(space: RoutingSpace, mix: str) -> list[int]:
    return [i % len(space) for i in ID_MIXES[mix]]


# -- plan ------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("mix", sorted(ID_MIXES))
@pytest.mark.parametrize("seq_len", [1, 5])
def test_plan_kernel_matches_reference_and_tiles_cover_rows(space_name, mix, seq_len):
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, mix), seq_len, torch.float32)
    assert torch.equal(s.buffers.order, s.plan.order)
    assert torch.equal(s.buffers.group_offsets, s.plan.group_offsets)
    assert s.buffers.row_config.tolist() == s.ids[s.plan.order].tolist()

    # Plan mode (tables from a given plan) agrees with sort mode.
    again = k_plan.PlanBuffers(s.batch, seq_len, len(space), space.max_depth, torch.device("cpu"))
    k_plan.build_plan(
        again, s.config_table, s.plan.group_config, order=s.plan.order,
        group_offsets=s.plan.group_offsets,
    )
    assert torch.equal(again.ranges, s.buffers.ranges)
    assert torch.equal(again.row_config, s.buffers.row_config)

    # Host-side index checks: every launch's tiles cover exactly its rows, one config each.
    tiles, ranges = s.buffers.tiles.tolist(), s.buffers.ranges.tolist()
    depths = [c.depth for c in s.sorted_configs]

    def covered(row):
        token_tiles, last_begin, last_end = ranges[row]
        rows = []
        for t in list(range(token_tiles)) + [
            s.buffers.token_capacity + i for i in range(last_begin, last_end)
        ]:
            config, start, end = tiles[t]
            assert 0 < end - start <= k_plan.TILE_ROWS
            is_last = t >= s.buffers.token_capacity
            for r in range(start, end):
                user = r if is_last else r // seq_len
                assert s.buffers.row_config[user] == config
                rows.append(r * seq_len + seq_len - 1 if is_last else r)
        assert len(rows) == len(set(rows))
        return sorted(rows)

    every = list(range(s.batch * seq_len))
    assert covered(k_plan.launch_row("embed")) == every
    for layer in range(space.max_depth):
        want = [r for r in every if depths[r // seq_len] > layer]
        assert covered(k_plan.launch_row("qkv", layer)) == want
        want = sorted(
            [r for r in every if depths[r // seq_len] > layer + 1]
            + [u * seq_len + seq_len - 1 for u in range(s.batch) if depths[u] == layer + 1]
        )
        assert covered(k_plan.launch_row("dense", layer)) == want
    output = covered(output_row(space))
    assert output == [u * seq_len + seq_len - 1 for u in range(s.batch)]


def output_row(space: RoutingSpace) -> int:
    return k_plan.launch_row("output", max_depth=space.max_depth)


# -- grouped linear --------------------------------------------------------------------------


def prefix_nan(x: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Rows of x with every column past the row's width set to NaN: a kernel that reads past a
    group's K would turn its output NaN."""
    x = x.clone()
    for row, width in enumerate(widths):
        x[row, width:] = float("nan")
    return x


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("mix", ["odd_mix", "one_user"])
def test_embedding_projection(dtype, space_name, mix):
    check_embedding_projection(dtype, space_name, mix)


@pytest.mark.interpreter
def test_embedding_projection_with_narrow_column_blocks():
    """A non-default block_n (several column blocks per row tile) gives the same result."""
    check_embedding_projection(torch.float32, "odd", "odd_mix", block_n=16)


@pytest.mark.parametrize("block_n", [0, 8, 24, 100, 127, -16, 32.0, True])
def test_grouped_linear_rejects_block_n_that_is_not_a_power_of_two_of_at_least_16(block_n):
    """Checked before anything is launched: Triton would only fail while compiling."""
    space, batch, seq_len = SPACES["odd"], 2, 3
    buffers = k_plan.PlanBuffers(batch, seq_len, len(space), space.max_depth, torch.device("cpu"))
    width = space.max_hidden
    x = torch.zeros(batch * seq_len, width)
    weights = k_linear.GroupedLinearWeights(torch.zeros(width, width), torch.zeros(width))
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        k_linear.grouped_linear(
            "gelu", weights, x, tiles=buffers.tiles, ranges=buffers.ranges[0],
            config_table=space.table().to(torch.int32), hidden_sizes=space.hidden,
            emb_sizes=space.emb, seq_len=seq_len, k_source="hidden", n_source="ffn", a=x,
            token_capacity=buffers.token_capacity, block_n=block_n,
        )


def check_embedding_projection(dtype, space_name, mix, block_n=128):
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, mix), 5, dtype)
    emb_w, hid_w = space.max_emb, space.max_hidden
    item_emb, pos_emb = s.randn(s.num_items + 1, emb_w), s.randn(s.seq_len, emb_w)
    weights = k_linear.GroupedLinearWeights(s.randn(hid_w, emb_w), s.randn(hid_w))
    buffer, x = guarded((s.batch * s.seq_len, hid_w), dtype)
    k_linear.grouped_linear(
        "bias", weights, x, ranges=s.buffers.ranges[0], gather=(s.seqs, item_emb, pos_emb),
        order=s.buffers.order, block_n=block_n, **s.common("emb", "hidden"),
    )
    assert_guards(buffer)
    owned = torch.zeros_like(x, dtype=torch.bool)
    want = torch.zeros(x.shape, dtype=torch.float32)
    for r, config in enumerate(s.sorted_configs):
        h, e = config.hidden, config.emb
        seq = s.seqs[s.buffers.order[r]]
        a = (item_emb[seq] + pos_emb)[:, :e].float()
        rows = slice(r * s.seq_len, (r + 1) * s.seq_len)
        want[rows, :h] = a @ weights.weight[:h, :e].float().T + weights.bias[:h].float()
        owned[rows, :h] = True
    assert_written_exactly(x, owned, want, tolerance(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("layer", [0, 1])
def test_qkv_head_major(dtype, space_name, layer):
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, "odd_mix"), 4, dtype)
    width, heads = space.max_hidden, space.heads
    pad = k_attention.head_dim_block(width, heads)
    rows = s.batch * s.seq_len
    hidden_of_row = [s.sorted_configs[r // s.seq_len].hidden for r in range(rows)]
    x = prefix_nan(s.randn(rows, width), hidden_of_row)
    weights = k_linear.GroupedLinearWeights(s.randn(3 * width, width), s.randn(3 * width))
    buffer, qkv = guarded((3, heads, rows, pad), dtype)
    k_linear.grouped_linear(
        "qkv", weights, qkv, ranges=s.buffers.ranges[k_plan.launch_row("qkv", layer)], a=x,
        heads=heads, **s.common("hidden", "hidden"),
    )
    assert_guards(buffer)
    owned = torch.zeros(qkv.shape, dtype=torch.bool)
    want = torch.zeros(qkv.shape, dtype=torch.float32)
    for r in range(rows):
        config = s.sorted_configs[r // s.seq_len]
        if config.depth <= layer:
            continue
        h = config.hidden
        for which in range(3):
            w = weights.weight[which * width : which * width + h, :h].float()
            b = weights.bias[which * width : which * width + h].float()
            y = x[r, :h].float() @ w.T + b
            for c in range(h):
                want[which, c % heads, r, c // heads] = y[c]
                owned[which, c % heads, r, c // heads] = True
    assert_written_exactly(qkv, owned, want, tolerance(dtype))


def layer_norm_rows(z, weight, bias):
    return F.layer_norm(z, (z.shape[-1],), weight, bias, LN_EPS)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("epilogue", ["residual_ln", "gelu", "residual_ln_ffn"])
@pytest.mark.parametrize("layer", [0, 2])
def test_dense_epilogues(dtype, space_name, epilogue, layer):
    """Output projection (+ residual + LN), FFN1 (+ GELU), FFN2 (K = 4h, + residual + LN) at a
    layer where some users run every row, some only their last row and some nothing."""
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, "odd_mix"), 3, dtype)
    width = space.max_hidden
    rows = s.batch * s.seq_len
    k_source, n_source = {
        "residual_ln": ("hidden", "hidden"),
        "gelu": ("hidden", "ffn"),
        "residual_ln_ffn": ("ffn", "hidden"),
    }[epilogue]
    factor = {"hidden": 1, "ffn": 4}
    k_max, n_max = factor[k_source] * width, factor[n_source] * width
    hidden_of_row = [s.sorted_configs[r // s.seq_len].hidden for r in range(rows)]
    a = prefix_nan(s.randn(rows, k_max), [factor[k_source] * h for h in hidden_of_row])
    ln_w, ln_b = (1 + s.randn(n_max, scale=0.2)), s.randn(n_max)
    res_scale = torch.tensor(0.7, dtype=dtype)
    ln = epilogue != "gelu"
    weights = k_linear.GroupedLinearWeights(
        s.randn(n_max, k_max), s.randn(n_max), ln_w if ln else None, ln_b if ln else None,
        res_scale if ln else None,
    )
    buffer, out = guarded((rows, n_max), dtype)
    if ln:  # the residual lives in the output rows (in-place update)
        residual = prefix_nan(s.randn(rows, n_max), hidden_of_row)
        out.copy_(residual)
    k_linear.grouped_linear(
        "gelu" if epilogue == "gelu" else "residual_ln", weights, out,
        ranges=s.buffers.ranges[k_plan.launch_row("dense", layer)], a=a,
        **s.common(k_source, n_source),
    )
    assert_guards(buffer)
    owned = torch.zeros(out.shape, dtype=torch.bool)
    want = torch.zeros(out.shape, dtype=torch.float32)
    if ln:
        want = residual.float().clone()
        owned = torch.isfinite(residual)  # untouched rows keep their residual
    for user in range(s.batch):
        h = s.sorted_configs[user].hidden
        k, n = factor[k_source] * h, factor[n_source] * h
        for r in s.token_rows(user, layer):
            y = a[r, :k].float() @ weights.weight[:n, :k].float().T + weights.bias[:n].float()
            if ln:
                z = residual[r, :n].float() + 0.7 * y.to(dtype).float()
                want[r, :n] = layer_norm_rows(z, ln_w[:n].float(), ln_b[:n].float())
            else:
                want[r, :n] = F.gelu(y)
            owned[r, :n] = True
    assert_written_exactly(out, owned, want, tolerance(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("mix", sorted(ID_MIXES))
def test_output_scores_scatter_to_input_order(dtype, space_name, mix):
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, mix), 3, dtype)
    width, items = space.max_hidden, 150  # > one 128-wide column block, odd
    rows = s.batch * s.seq_len
    hidden_of_row = [s.sorted_configs[r // s.seq_len].hidden for r in range(rows)]
    x = prefix_nan(s.randn(rows, width), hidden_of_row)
    # Only the last position of each user may be read: poison the others.
    for user in range(s.batch):
        x[user * s.seq_len : (user + 1) * s.seq_len - 1] = float("nan")
    weights = k_linear.GroupedLinearWeights(s.randn(items, width), s.randn(items))
    buffer, out = guarded((s.batch, items), dtype)
    k_linear.grouped_linear(
        "scores", weights, out, ranges=s.buffers.ranges[output_row(space)], a=x,
        order=s.buffers.order, **s.common("hidden", "full"),
    )
    assert_guards(buffer)
    want = torch.empty(out.shape, dtype=torch.float32)
    for r, config in enumerate(s.sorted_configs):
        h = config.hidden
        last = x[(r + 1) * s.seq_len - 1, :h].float()
        user = s.buffers.order[r]
        want[user] = last @ weights.weight[:, :h].float().T + weights.bias.float()
    assert torch.isneginf(out[:, 0]).all()
    owned = torch.ones(out.shape, dtype=torch.bool)
    owned[:, 0] = False
    got = out.clone()
    got[:, 0] = float("nan")  # column 0 checked above
    assert_written_exactly(got, owned, want, tolerance(dtype))


# -- attention -------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("seq_len, layer", [(1, 0), (6, 0), (6, 1), (19, 2)])
def test_attention(dtype, space_name, seq_len, layer):
    space = SPACES[space_name]
    s = Setup(space, pick_ids(space, "odd_mix"), seq_len, dtype)
    width, heads = space.max_hidden, space.heads
    pad = k_attention.head_dim_block(width, heads)
    rows = s.batch * seq_len
    qkv = s.randn(3, heads, rows, pad, scale=1.0)
    for r in range(rows):  # poison the padded head dims: they must never be read
        qkv[:, :, r, s.sorted_configs[r // seq_len].hidden // heads :] = float("nan")
    buffer, out = guarded((rows, width), dtype)
    k_attention.grouped_attention(
        qkv, out, seqs=s.seqs, order=s.buffers.order, row_config=s.buffers.row_config,
        config_table=s.config_table, layer=layer, heads=heads,
    )
    assert_guards(buffer)
    owned = torch.zeros(out.shape, dtype=torch.bool)
    want = torch.zeros(out.shape, dtype=torch.float32)
    for user, config in enumerate(s.sorted_configs):
        if config.depth <= layer:
            continue
        h, d = config.hidden, config.hidden // heads
        token = slice(user * seq_len, (user + 1) * seq_len)
        q, k, v = (qkv[i, :, token, :d].float()[None] for i in range(3))  # [1, heads, L, d]
        seq = s.seqs[s.buffers.order[user]][None]
        o = merge_heads(attend(q, k, v, allowed_keys(seq), 1.0 / math.sqrt(d)))[0]  # [L, h]
        for r in s.token_rows(user, layer):
            want[r, :h] = o[r - user * seq_len]
            owned[r, :h] = True
    assert_written_exactly(out, owned, want, tolerance(dtype))


def test_split_heads_convention_matches_the_kernel_layout():
    """The kernels' interleaved layout is the model's: channel c = position * heads + head."""
    x = torch.arange(12.0).view(1, 1, 12)
    heads = split_heads(x, 4)
    for c in range(12):
        assert heads[0, c % 4, 0, c // 4] == c


# -- TTIR: 64-bit offsets -------------------------------------------------------------------


def _narrow_accesses(ttir: str, roots: set[str]) -> tuple[int, list[str]]:
    """Loads and stores through pointers derived from the function arguments ``roots`` whose
    derivation chain (splat, broadcast, expand_dims, addptr) never added a 64-bit offset.

    A row offset (``row * width``) added in 64-bit makes the chain wide; the column offset
    added after it may be 32-bit. Returns (accesses checked, narrow access lines)."""
    wide = {f"%{name}": False for name in roots}
    assign = re.compile(r"^\s*(%[\w.#]+)\s*=\s*(tt\.\w+)\s+(%[\w.#]+)")
    access = re.compile(r"\b(?:tt\.load|tt\.store)\s+(%[\w.#]+)")
    checked, narrow = 0, []
    for line in ttir.splitlines():
        match = assign.match(line)
        if match:
            result, op, operand = match.groups()
            if operand in wide and op in ("tt.splat", "tt.broadcast", "tt.expand_dims"):
                wide[result] = wide[operand]
            elif operand in wide and op == "tt.addptr":
                offset_type = line.rsplit(":", 1)[1].split(",", 1)[1]
                wide[result] = wide[operand] or "i64" in offset_type
        found = access.search(line)
        if found and found.group(1) in wide:
            checked += 1
            if not wide[found.group(1)]:
                narrow.append(line.strip())
    return checked, narrow


def _ttir_roots(ttir: str, fn, constexprs: dict, names: set[str]) -> set[str]:
    """SSA names (without ``%``) of the kernel arguments ``names`` in ``ttir``: triton 3.4
    prints the arguments as ``%arg0 .. %argN``, later versions under their Python names, so map
    them by position through the ``tt.func`` header (constexprs are not arguments there)."""
    header = next(line for line in ttir.splitlines() if "tt.func" in line)
    ssa = re.findall(r"%([\w.#]+): ", header)
    runtime = [name for name in fn.arg_names if name not in constexprs]
    assert len(ssa) == len(runtime), f"tt.func arguments {ssa} != runtime arguments {runtime}"
    return {ssa[runtime.index(name)] for name in names}


def _compile_ttir(fn, signature: dict, constexprs: dict) -> str:
    from triton.backends.compiler import GPUTarget

    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]


def _linear_case(epilogue: str, gather: bool):
    ptr = "*fp16"
    signature = {
        "a_ptr": ptr, "lda": "i32", "seqs_ptr": "*i64", "order_ptr": "*i64",
        "item_emb_ptr": ptr, "pos_emb_ptr": ptr, "ld_emb": "i32", "w_ptr": ptr, "ldw": "i32",
        "bias_ptr": ptr, "out_ptr": ptr, "ld_out": "i32", "ln_weight_ptr": ptr,
        "ln_bias_ptr": ptr, "res_scale_ptr": ptr, "tiles_ptr": "*i64", "ranges_ptr": "*i32",
        "config_table_ptr": "*i32", "seq_len": "i32", "full_n": "i32", "token_capacity": "i32",
        "qkv_rows": "i32",
    }
    code = k_linear.EPILOGUES[epilogue]
    constexprs = {
        "K_SOURCE": 0 if gather else 1, "N_SOURCE": 3 if epilogue == "scores" else 1,
        "N_BLOCKS": 3 if epilogue == "qkv" else 1, "EPILOGUE": code, "GATHER": gather,
        "HAS_RES_SCALE": True, "EVEN_K": True, "HEADS": 4, "HEAD_DIM_PAD": 32,
        "QKV_STRIDE": 128, "PRECISION": "ieee", "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32,
    }
    big = {"out_ptr", "a_ptr", "item_emb_ptr", "pos_emb_ptr", "w_ptr", "seqs_ptr"}
    return k_linear._grouped_linear_kernel, signature, constexprs, big


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels; the interpreter replaces triton.jit")
@pytest.mark.parametrize(
    "case",
    ["linear-gather", "linear-qkv", "linear-ln", "linear-gelu", "linear-scores", "attention",
     "plan"],
)
def test_ttir_offsets_into_large_buffers_are_64_bit(case):
    """(B = L = 1, where ints equal to 1 could become constants, is compiled for sm_90 by
    tests/test_kernel_report.py from real launches.)"""
    if case.startswith("linear"):
        epilogue = {"gather": "bias", "qkv": "qkv", "ln": "residual_ln", "gelu": "gelu",
                    "scores": "scores"}[case.split("-")[1]]
        fn, signature, constexprs, big = _linear_case(epilogue, gather=case == "linear-gather")
    elif case == "attention":
        fn = k_attention._grouped_attention_kernel
        signature = {
            "qkv_ptr": "*fp16", "out_ptr": "*fp16", "ld_out": "i32", "seqs_ptr": "*i64",
            "order_ptr": "*i64", "row_config_ptr": "*i32", "config_table_ptr": "*i32",
            "qkv_rows": "i32", "seq_len": "i32", "layer": "i32",
        }
        constexprs = {"HEADS": 4, "HEAD_DIM_PAD": 32, "QUERY_BLOCKS": 1, "PRECISION": "ieee",
                      "BLOCK_M": 64, "BLOCK_N": 64}
        big = {"qkv_ptr", "out_ptr", "seqs_ptr"}
    else:
        fn = k_plan._plan_kernel
        signature = {
            "config_ids_ptr": "*i64", "config_rank_ptr": "*i32", "group_config_ptr": "*i64",
            "group_offsets_ptr": "*i64", "order_ptr": "*i64", "row_config_ptr": "*i32",
            "config_table_ptr": "*i32", "tiles_ptr": "*i64", "ranges_ptr": "*i32",
            "num_users": "i32", "num_configs": "i32", "seq_len": "i32", "token_capacity": "i32",
        }
        constexprs = {"SORT": True, "MAX_DEPTH": 8, "GROUPS_PAD": 64, "BLOCK_USERS": 128,
                      "BLOCK_TILES": 128, "TILE": 64}
        big = {"tiles_ptr"}
    ttir = _compile_ttir(fn, signature, constexprs)
    checked, narrow = _narrow_accesses(ttir, _ttir_roots(ttir, fn, constexprs, big))
    assert checked, "found no loads or stores through the large buffers"
    assert not narrow, "32-bit offsets into a large buffer:\n" + "\n".join(narrow)


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_attention(dtype):
    space = SPACES["even"]
    s = Setup(space, pick_ids(space, "odd_mix") * 9, 50, dtype, device="cuda")
    heads, width = space.heads, space.max_hidden
    rows = s.batch * s.seq_len
    qkv = s.randn(3, heads, rows, 16, scale=1.0)
    out = torch.full((rows, width), float("nan"), dtype=dtype, device="cuda")
    seqs = s.seqs.cuda()
    k_attention.grouped_attention(
        qkv, out, seqs=seqs, order=s.buffers.order, row_config=s.buffers.row_config,
        config_table=s.config_table.cuda(), layer=0, heads=heads,
    )
    for user, config in enumerate(s.sorted_configs):
        h, d = config.hidden, config.hidden // heads
        token = slice(user * s.seq_len, (user + 1) * s.seq_len)
        q, k, v = (qkv[i, :, token, :d].float()[None] for i in range(3))
        seq = seqs[s.buffers.order[user]][None]
        o = merge_heads(attend(q, k, v, allowed_keys(seq), 1.0 / math.sqrt(d)))[0]
        rows_of = s.token_rows(user, 0)
        got = out[rows_of, :h].float()
        torch.testing.assert_close(got, o[[r - user * s.seq_len for r in rows_of]],
                                   rtol=3e-2, atol=3e-2)
