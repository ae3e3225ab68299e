"""Grouped, slice-aware linear layers of the supernet: one persistent launch for every group.

Each group (users routed to one config) multiplies its rows by a PREFIX slice of the max-size
weight, read in place: ``W[:N_g, :K_g]`` of a ``[N_max, K_max]`` tensor with its max leading
dimension. One program per SM walks the work list ``(row tile, column block)``; the row tiles
come from the device tile table of :mod:`canet.kernels.plan`, so the host never learns the
group sizes (no sync, CUDA-graph safe) and a launch covers all groups whatever their number.

``BLOCK_K`` (32) divides every K of the default space (64/96/128 and 4x those), so K needs no
masks there; other spaces compile a masked variant. No split-K: results are deterministic.

Epilogues, fused on the fp32 accumulator (see :data:`EPILOGUES`):

* ``bias``: ``y = acc + b`` (plain rows).
* ``gelu``: ``y = GELU_erf(acc + b)`` (FFN1).
* ``residual_ln``: ``x = LN_h(x + s * (acc + b))`` in place over the group's prefix ``h``
  (attention output projection and FFN2; a whole row fits one tile: BLOCK_N >= max hidden).
* ``qkv``: ``acc + b`` scattered head-major to ``[3, heads, rows, head_dim_pad]`` with
  interleaved heads (channel ``c`` -> head ``c % heads``, position ``c // heads``).
* ``scores``: ``acc + b`` to ``out[order[user], n]``, column 0 = -inf (the output layer).

The A operand is either plain rows of an activation buffer (``[rows, lda]``) or, for the input
projection, gathered on the fly: ``item_emb[seq[order[u], t], :e] + pos_emb[t, :e]``.

Row convention: a token tile's rows are token rows ``u * L + t`` of the sorted batch; a last
tile's rows are sorted users and stand for token row ``u * L + L - 1``. Offsets that multiply
a row by a width are int64 (``B * L * 512`` and ``B * (N + 1)`` can pass 2^31).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import head_dim_block
from .plan import TILE_ROWS

__all__ = ["EPILOGUES", "K_SOURCES", "N_SOURCES", "GroupedLinearWeights", "grouped_linear"]

EPILOGUES = {"bias": 0, "gelu": 1, "residual_ln": 2, "qkv": 3, "scores": 4}
# Which per-config size bounds K / N of a group: "emb", "hidden", "ffn" (4 * hidden), or the
# weight's full size ("full", the output layer's N + 1 items).
K_SOURCES = {"emb": 0, "hidden": 1, "ffn": 2}
N_SOURCES = {"hidden": 1, "ffn": 2, "full": 3}

_BIAS, _GELU, _RESIDUAL_LN, _QKV, _SCORES = range(5)


@triton.jit
def _config_size(config_table_ptr, config, SOURCE: tl.constexpr, full):
    """K or N bound of a config: 0 emb, 1 hidden, 2 4*hidden, 3 ``full``."""
    if SOURCE == 0:
        size = tl.load(config_table_ptr + config * 3 + 2)
    elif SOURCE == 1:
        size = tl.load(config_table_ptr + config * 3 + 1)
    elif SOURCE == 2:
        size = 4 * tl.load(config_table_ptr + config * 3 + 1)
    else:
        size = full + 0 * config
    return size


# Not specialized (16-divisibility, == 1, 16-byte alignment): the batch-dependent ints, seq_len
# (max_len: a constant 1 saves nothing), the input rows seqs/order (the engine passes row slices
# of a batch) and ``ranges_ptr`` (a row of the per-layer table, 12-byte rows). One compile
# serves every batch size, slice and layer. The leading dimensions and full_n (N + 1, fixed
# per weight: divisible by 16, it vectorizes the scores store) stay specialized.
@triton.jit(
    do_not_specialize=["seq_len", "token_capacity", "qkv_rows"],
    do_not_specialize_on_alignment=["seqs_ptr", "order_ptr", "ranges_ptr"],
)
def _grouped_linear_kernel(
    a_ptr,  # [rows, lda] activations (unused when GATHER)
    lda,
    seqs_ptr,  # [B, L] int64 item ids, original user order (GATHER)
    order_ptr,  # [B] int64 original user of each sorted row (GATHER, SCORES)
    item_emb_ptr,  # [N + 1, ld_emb] (GATHER)
    pos_emb_ptr,  # [L, ld_emb] (GATHER)
    ld_emb,
    w_ptr,  # [N_max, ldw] weight, read in place
    ldw,
    bias_ptr,  # [N_max]
    out_ptr,  # see the epilogues
    ld_out,
    ln_weight_ptr,  # [H] (RESIDUAL_LN)
    ln_bias_ptr,  # [H] (RESIDUAL_LN)
    res_scale_ptr,  # [] residual scale (RESIDUAL_LN with HAS_RES_SCALE)
    tiles_ptr,  # [capacity, 3] int64 (config, row start, row end)
    ranges_ptr,  # [3] int32 (token tiles, last begin, last end) of this launch
    config_table_ptr,  # [C, 3] int32 (depth, hidden, emb)
    seq_len,
    full_n,  # N bound when N_SOURCE is "full"
    token_capacity,  # index of the first last tile in tiles
    qkv_rows,  # rows of the head-major QKV buffer (B * L)
    K_SOURCE: tl.constexpr,
    N_SOURCE: tl.constexpr,
    N_BLOCKS: tl.constexpr,  # column blocks per row tile (max over groups)
    EPILOGUE: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_RES_SCALE: tl.constexpr,
    EVEN_K: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    QKV_STRIDE: tl.constexpr,  # weight rows between the q, k and v blocks (max hidden)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 ("ieee" = tf32 off)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token_tiles = tl.load(ranges_ptr + 0)
    last_begin = tl.load(ranges_ptr + 1)
    last_end = tl.load(ranges_ptr + 2)
    row_tiles = token_tiles + (last_end - last_begin)
    work = row_tiles * N_BLOCKS
    out_dtype = out_ptr.dtype.element_ty
    w_dtype = w_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # Persistent loop: consecutive work items share a row tile (its A rows stay in L2).
    for item in range(tl.program_id(0), work, tl.num_programs(0)):
        row_tile = item // N_BLOCKS
        col_block = item % N_BLOCKS
        is_last = row_tile >= token_tiles
        entry = tl.where(is_last, token_capacity + last_begin + row_tile - token_tiles, row_tile)
        entry_ptr = tiles_ptr + entry.to(tl.int64) * 3
        config = tl.load(entry_ptr).to(tl.int32)
        row_start = tl.load(entry_ptr + 1)
        row_end = tl.load(entry_ptr + 2)
        k_size = _config_size(config_table_ptr, config, K_SOURCE, full_n)
        n_size = _config_size(config_table_ptr, config, N_SOURCE, full_n)
        if EPILOGUE == 3:
            # Column block j is the q, k or v block; the group's own width bounds it.
            cols = offs_n
            w_rows = col_block * QKV_STRIDE + offs_n
            col_live = offs_n < n_size
            block_live = True
        else:
            cols = col_block * BLOCK_N + offs_n
            w_rows = cols
            col_live = cols < n_size
            block_live = col_block * BLOCK_N < n_size
        if block_live:
            rows = row_start + offs_m  # int64
            row_live = rows < row_end
            # A last tile's row u stands for the token row of u's last position.
            token = tl.where(is_last, rows * seq_len + seq_len - 1, rows)
            if GATHER:
                user_row = token // seq_len
                position = token - user_row * seq_len
                user = tl.load(order_ptr + user_row, mask=row_live, other=0)
                item_id = tl.load(seqs_ptr + user * seq_len + position, mask=row_live, other=0)
                a_row_ptr = item_emb_ptr + item_id * ld_emb
                p_row_ptr = pos_emb_ptr + position * ld_emb
            else:
                a_row_ptr = a_ptr + token * lda
            w_col_ptr = w_ptr + w_rows.to(tl.int64) * ldw

            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, k_size, BLOCK_K):
                ks = k0 + offs_k
                if EVEN_K:
                    a_mask = row_live[:, None]
                    w_mask = col_live[None, :]
                else:
                    a_mask = row_live[:, None] & (ks[None, :] < k_size)
                    w_mask = col_live[None, :] & (ks[:, None] < k_size)
                if GATHER:
                    emb = tl.load(a_row_ptr[:, None] + ks[None, :], mask=a_mask, other=0.0)
                    pos = tl.load(p_row_ptr[:, None] + ks[None, :], mask=a_mask, other=0.0)
                    # The reference adds in the model's dtype; round the same way.
                    a = (emb + pos).to(w_dtype)
                else:
                    a = tl.load(a_row_ptr[:, None] + ks[None, :], mask=a_mask, other=0.0)
                w = tl.load(w_col_ptr[None, :] + ks[:, None], mask=w_mask, other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)

            if EPILOGUE == 3:
                bias = tl.load(bias_ptr + w_rows, mask=col_live, other=0.0)
            else:
                bias = tl.load(bias_ptr + cols, mask=col_live, other=0.0)
            y = acc + bias.to(tl.float32)[None, :]
            live = row_live[:, None] & col_live[None, :]

            if EPILOGUE == 0:
                tl.store(out_ptr + token[:, None] * ld_out + cols[None, :], y.to(out_dtype),
                         mask=live)
            elif EPILOGUE == 1:
                y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
                tl.store(out_ptr + token[:, None] * ld_out + cols[None, :], y.to(out_dtype),
                         mask=live)
            elif EPILOGUE == 2:
                # The reference rounds the projection to the model dtype before the residual.
                y = y.to(out_dtype).to(tl.float32)
                x_ptrs = out_ptr + token[:, None] * ld_out + cols[None, :]
                residual = tl.load(x_ptrs, mask=live, other=0.0).to(tl.float32)
                if HAS_RES_SCALE:
                    y = y * tl.load(res_scale_ptr).to(tl.float32)
                z = tl.where(live, residual + y, 0.0)
                width = n_size.to(tl.float32)
                mean = tl.sum(z, axis=1) / width
                centred = tl.where(live, z - mean[:, None], 0.0)
                var = tl.sum(centred * centred, axis=1) / width
                gamma = tl.load(ln_weight_ptr + cols, mask=col_live, other=0.0).to(tl.float32)
                beta = tl.load(ln_bias_ptr + cols, mask=col_live, other=0.0).to(tl.float32)
                x = centred * tl.rsqrt(var + 1e-5)[:, None] * gamma[None, :] + beta[None, :]
                tl.store(x_ptrs, x.to(out_dtype), mask=live)
            elif EPILOGUE == 3:
                head = cols % HEADS
                slot = cols // HEADS
                dst = ((col_block * HEADS + head).to(tl.int64) * qkv_rows)[None, :] + token[:, None]
                tl.store(out_ptr + dst * HEAD_DIM_PAD + slot[None, :], y.to(out_dtype), mask=live)
            else:
                user = tl.load(order_ptr + rows, mask=row_live, other=0)
                y = tl.where(cols[None, :] == 0, float("-inf"), y)
                tl.store(out_ptr + user[:, None] * ld_out + cols[None, :], y.to(out_dtype),
                         mask=live)


class GroupedLinearWeights:
    """The tensors of one grouped linear: ``weight [N_max, K_max]`` (rows = outputs), ``bias``,
    and for ``residual_ln`` the LayerNorm affine and the residual scale (0-d tensor or None)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        ln_weight: torch.Tensor | None = None,
        ln_bias: torch.Tensor | None = None,
        res_scale: torch.Tensor | None = None,
    ) -> None:
        if weight.dim() != 2 or weight.stride(1) != 1:
            raise ValueError(f"weight must be 2-D with unit column stride, got {weight.shape}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0] or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous [{weight.shape[0]}], got {bias.shape}")
        self.weight, self.bias = weight, bias
        self.ln_weight, self.ln_bias, self.res_scale = ln_weight, ln_bias, res_scale


@functools.cache
def _launch_grid(device: torch.device) -> int:
    """Persistent programs: one per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def grouped_linear(
    epilogue: str,
    weights: GroupedLinearWeights,
    out: torch.Tensor,
    *,
    tiles: torch.Tensor,
    ranges: torch.Tensor,
    config_table: torch.Tensor,
    hidden_sizes: tuple[int, ...],
    emb_sizes: tuple[int, ...],
    seq_len: int,
    k_source: str,
    n_source: str,
    a: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    order: torch.Tensor | None = None,
    token_capacity: int,
    heads: int = 1,
    precision: str = "ieee",
    num_programs: int | None = None,
    block_n: int = 128,
) -> torch.Tensor:
    """One grouped linear launch over the tiles ``ranges`` selects; returns ``out``.

    Args:
        epilogue: one of :data:`EPILOGUES`.
        weights: the max-size weight and its epilogue tensors.
        out: destination. bias/gelu/residual_ln: ``[B * L, ld]`` token rows (residual_ln reads
            the residual from it and writes in place); qkv: ``[3, heads, B * L, head_dim_pad]``
            contiguous; scores: ``[B, N + 1]`` in the users' original order.
        tiles, ranges: from :class:`canet.kernels.plan.PlanBuffers` (``ranges`` is one row).
        config_table: ``[C, 3]`` int32 (depth, hidden, emb).
        hidden_sizes, emb_sizes: the routing space's sizes, ascending (host values: reading
            them from config_table would cost a device sync per launch).
        seq_len: L.
        k_source, n_source: which per-config size bounds K and N (:data:`K_SOURCES`,
            :data:`N_SOURCES`).
        a: ``[B * L, lda]`` activations, unit column stride (when not gathering).
        gather: ``(seqs [B, L] int64, item_emb [N + 1, E], pos_emb [L, E])`` to build A from the
            embeddings (the input projection); needs ``order``.
        order: ``[B]`` int64 original user of each sorted row (gather and scores).
        token_capacity: first last tile in ``tiles``.
        heads: attention heads (qkv layout).
        precision: fp32 ``tl.dot`` input precision, "ieee" (tf32 off) or "tf32".
        num_programs: persistent programs (default: one per SM).
        block_n: output columns per tile for the bias, gelu and scores epilogues (qkv and
            residual_ln size their own); a power of two >= 16 (``tl.arange`` and ``tl.dot``
            need it).
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {list(EPILOGUES)}")
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 16 or (
        block_n & (block_n - 1)
    ):
        raise ValueError(f"grouped_linear: block_n must be a power of two >= 16, got {block_n!r}")
    code = EPILOGUES[epilogue]
    weight, bias = weights.weight, weights.bias
    device = weight.device
    if (a is None) == (gather is None):
        raise ValueError("grouped_linear: pass exactly one of a and gather")
    if (gather is not None or code == _SCORES) and order is None:
        raise ValueError("grouped_linear: gather and the scores epilogue need order")
    if out.stride(-1) != 1:
        raise ValueError("grouped_linear: out needs a unit last stride")
    if out.dtype != weight.dtype:
        raise ValueError(f"grouped_linear: out dtype {out.dtype} != weight dtype {weight.dtype}")
    if ranges.shape != (3,) or ranges.dtype != torch.int32:
        raise ValueError(f"grouped_linear: ranges must be int32 [3], got {ranges.shape}")
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype != torch.int64:
        raise ValueError("grouped_linear: tiles must be int64 [capacity, 3]")
    if not tiles.is_contiguous() or not config_table.is_contiguous():
        raise ValueError("grouped_linear: tiles and config_table must be contiguous")
    if config_table.dtype != torch.int32 or config_table.shape[1:] != (3,):
        raise ValueError("grouped_linear: config_table must be int32 [C, 3]")
    hidden_sizes, emb_sizes = sorted(hidden_sizes), sorted(emb_sizes)
    k_sizes = {"emb": emb_sizes, "hidden": hidden_sizes, "ffn": [4 * h for h in hidden_sizes]}
    k_sizes = k_sizes[k_source]
    if max(k_sizes) > weight.shape[1]:
        raise ValueError(f"grouped_linear: K up to {max(k_sizes)} > weight width {weight.shape[1]}")
    block_k = 32 if min(k_sizes) >= 32 else 16
    even_k = all(k % block_k == 0 for k in k_sizes)

    full_n = weight.shape[0]
    max_hidden = hidden_sizes[-1]
    head_dim_pad = 1
    if code == _QKV:
        if weight.shape[0] != 3 * max_hidden:
            raise ValueError("grouped_linear: qkv weight must be [3 * H, H]")
        head_dim_pad = head_dim_block(max_hidden, heads)
        block_n = max(16, triton.next_power_of_2(max_hidden))
        n_blocks = 3
        if out.dim() != 4 or out.shape[:2] != (3, heads) or out.shape[3] != head_dim_pad:
            raise ValueError(
                f"grouped_linear: qkv out must be [3, {heads}, rows, {head_dim_pad}], "
                f"got {tuple(out.shape)}"
            )
        if not out.is_contiguous():
            raise ValueError("grouped_linear: qkv out must be contiguous")
        qkv_rows, ld_out = out.shape[2], 0
    else:
        n_max = {"hidden": max_hidden, "ffn": 4 * max_hidden, "full": full_n}[n_source]
        if code == _RESIDUAL_LN:
            block_n = max(16, triton.next_power_of_2(n_max))  # a whole row in one tile
            if weights.ln_weight is None or weights.ln_bias is None:
                raise ValueError("grouped_linear: residual_ln needs the LayerNorm weight/bias")
        n_blocks = triton.cdiv(n_max, block_n)
        if out.dim() != 2 or out.shape[1] < n_max:
            raise ValueError(f"grouped_linear: out must be 2-D with >= {n_max} columns")
        qkv_rows, ld_out = 0, out.stride(0)
    if gather is not None:
        seqs, item_emb, pos_emb = gather
        if seqs.dtype != torch.int64 or not seqs.is_contiguous() or seqs.shape[1] != seq_len:
            raise ValueError("grouped_linear: seqs must be contiguous int64 [B, L]")
        if item_emb.stride() != pos_emb.stride() or item_emb.stride(1) != 1:
            raise ValueError("grouped_linear: item_emb and pos_emb need the same row stride")
        a_arg, lda, ld_emb = item_emb, 0, item_emb.stride(0)
    else:
        if a.stride(-1) != 1 or a.dim() != 2:
            raise ValueError("grouped_linear: a must be 2-D with a unit column stride")
        seqs = item_emb = pos_emb = a
        a_arg, lda, ld_emb = a, a.stride(0), 0
    res_scale = weights.res_scale
    grid = (num_programs or _launch_grid(device),)
    _grouped_linear_kernel[grid](
        a_arg, lda,
        seqs, order if order is not None else tiles, item_emb, pos_emb, ld_emb,
        weight, weight.stride(0), bias,
        out, ld_out,
        weights.ln_weight if weights.ln_weight is not None else bias,
        weights.ln_bias if weights.ln_bias is not None else bias,
        res_scale if res_scale is not None else bias,
        tiles, ranges, config_table,
        seq_len, full_n, token_capacity, qkv_rows,
        K_SOURCE=K_SOURCES[k_source],
        N_SOURCE=N_SOURCES[n_source],
        N_BLOCKS=n_blocks,
        EPILOGUE=code,
        GATHER=gather is not None,
        HAS_RES_SCALE=res_scale is not None,
        EVEN_K=even_k,
        HEADS=heads,
        HEAD_DIM_PAD=head_dim_pad,
        QKV_STRIDE=max_hidden,
        PRECISION=precision,
        BLOCK_M=TILE_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4 if block_n <= 64 else 8,
        num_stages=3,
    )
    return out
