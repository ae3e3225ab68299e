"""Grouped causal attention with key padding and per-group head dims, one launch per layer.

Reads q, k, v from the head-major buffer ``[3, heads, B * L, HEAD_DIM_PAD]`` the qkv
projection writes, and writes ``o [B * L, ld_out]`` with interleaved heads (channel
``c = position * heads + head``), ready for the output projection.

Semantics (``canet.model.attend`` with ``allowed_keys``): query ``t`` attends to keys
``j <= t`` whose item is not padding, plus itself, with the group's own scale
``1/sqrt(hidden / heads)``; the head dim (16/24/32 for hidden 64/96/128) is a 32-wide block
with masks. Softmax is online over key blocks (flash-attention style, fp32 statistics).

The grid is ``B * query_blocks(max_len) * heads``: sized from shapes only, never from a
per-batch value. A program whose user is no longer active at ``layer`` exits at once; for a
user whose final block is ``layer`` only the query block holding the last position runs and
only the last row is stored (the next ops only read that row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grouped_attention", "head_dim_block"]

_LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jit code may read it


def head_dim_block(max_hidden: int, heads: int) -> int:
    """Width of the head-dim block (the qkv buffer's last dim): the max head dim rounded up to
    a power of two, at least 16 (the smallest K of ``tl.dot`` on tensor cores)."""
    return max(16, triton.next_power_of_2(max_hidden // heads))


# Not specialized (16-divisibility, == 1, 16-byte alignment): the batch-dependent qkv_rows, the
# layer, seq_len (max_len: a constant 1 saves nothing) and the input rows seqs/order (the engine
# passes row slices of a batch). One compile serves every batch size, slice and layer; ld_out
# and HEAD_DIM_PAD keep giving the vector widths.
@triton.jit(
    do_not_specialize=["qkv_rows", "seq_len", "layer"],
    do_not_specialize_on_alignment=["seqs_ptr", "order_ptr"],
)
def _grouped_attention_kernel(
    qkv_ptr,  # [3, HEADS, qkv_rows, HEAD_DIM_PAD]
    out_ptr,  # [B * L, ld_out]
    ld_out,
    seqs_ptr,  # [B, L] int64, original user order
    order_ptr,  # [B] int64
    row_config_ptr,  # [B] int32 config of each sorted row
    config_table_ptr,  # [C, 3] int32 (depth, hidden, emb)
    qkv_rows,
    seq_len,
    layer,
    HEADS: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    QUERY_BLOCKS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid % HEADS
    query_block = (pid // HEADS) % QUERY_BLOCKS
    user_row = (pid // HEADS // QUERY_BLOCKS).to(tl.int64)
    config = tl.load(row_config_ptr + user_row)
    depth = tl.load(config_table_ptr + config * 3)
    hidden = tl.load(config_table_ptr + config * 3 + 1)
    query_start = query_block * BLOCK_M
    holds_last = query_start + BLOCK_M >= seq_len
    # Run if the user is active, and for a user in its final block only the last query block.
    if (depth > layer) & (holds_last | (depth > layer + 1)):
        head_dim = hidden // HEADS
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_live = dims < head_dim
        queries = query_start + tl.arange(0, BLOCK_M)
        query_live = queries < seq_len
        token0 = user_row * seq_len
        head_rows = head.to(tl.int64) * qkv_rows + token0  # row of (q, head, position 0)
        plane = HEADS * tl.cast(qkv_rows, tl.int64)  # rows between the q, k and v planes
        q = tl.load(
            qkv_ptr + (head_rows + queries)[:, None] * HEAD_DIM_PAD + dims[None, :],
            mask=query_live[:, None] & dim_live[None, :], other=0.0,
        )
        user = tl.load(order_ptr + user_row)
        # log2(e) folded into the scale: the softmax runs on exp2.
        scale = _LOG2E / tl.sqrt(head_dim.to(tl.float32))

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        key_end = tl.minimum(query_start + BLOCK_M, seq_len)  # causal: no key past the block
        for key_start in range(0, key_end, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            key_live = keys < seq_len
            kv_mask = key_live[:, None] & dim_live[None, :]
            k = tl.load(
                qkv_ptr + (plane + head_rows + keys)[:, None] * HEAD_DIM_PAD + dims[None, :],
                mask=kv_mask, other=0.0,
            )
            v = tl.load(
                qkv_ptr + (2 * plane + head_rows + keys)[:, None] * HEAD_DIM_PAD + dims[None, :],
                mask=kv_mask, other=0.0,
            )
            item = tl.load(seqs_ptr + user * seq_len + keys, mask=key_live, other=0)
            allowed = (keys[None, :] <= queries[:, None]) & (
                (item != 0)[None, :] | (keys[None, :] == queries[:, None])
            )
            allowed = allowed & key_live[None, :]
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            logits = tl.where(allowed, logits, -1.0e30)
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            # A row may see no allowed key in a block before its diagonal: its probabilities
            # are forced to 0 and a -inf running max rescales by exp2(-inf) = 0.
            p = tl.where(allowed, tl.exp2(logits - new_max[:, None]), 0.0)
            rescale = tl.exp2(row_max - new_max)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            row_max = new_max
        o = acc / row_sum[:, None]  # every live row has its diagonal: row_sum > 0

        # Every row while the user has blocks left; in its final block the last row only.
        depth_rows = tl.zeros([BLOCK_M], dtype=tl.int32) + depth
        store_row = query_live & ((queries == seq_len - 1) | (depth_rows > layer + 1))
        out_cols = dims * HEADS + head
        tl.store(
            out_ptr + (token0 + queries)[:, None] * ld_out + out_cols[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=store_row[:, None] & dim_live[None, :],
        )


def grouped_attention(
    qkv: torch.Tensor,
    out: torch.Tensor,
    *,
    seqs: torch.Tensor,
    order: torch.Tensor,
    row_config: torch.Tensor,
    config_table: torch.Tensor,
    layer: int,
    heads: int,
    precision: str = "ieee",
) -> torch.Tensor:
    """Attention of every user active at ``layer``; returns ``out``.

    Args:
        qkv: ``[3, heads, B * L, head_dim_pad]`` contiguous (q, k, v planes, head-major).
        out: ``[B * L, >= max hidden]`` with a unit column stride; channel ``d * heads + h``.
        seqs: ``[B, L]`` int64 contiguous, the users' original order (padding = 0).
        order: ``[B]`` int64, original user of each sorted row.
        row_config: ``[B]`` int32, config of each sorted row.
        config_table: ``[C, 3]`` int32 (depth, hidden, emb).
        layer: block index; users with depth <= layer are skipped, users whose final block is
            ``layer`` get their last row only.
    """
    batch, seq_len = seqs.shape
    if qkv.dim() != 4 or qkv.shape[0] != 3 or qkv.shape[1] != heads or not qkv.is_contiguous():
        raise ValueError(f"grouped_attention: qkv must be contiguous [3, {heads}, rows, d]")
    if qkv.shape[2] != batch * seq_len:
        raise ValueError(f"grouped_attention: qkv has {qkv.shape[2]} rows, expected B * L")
    head_dim_pad = qkv.shape[3]
    if head_dim_pad & (head_dim_pad - 1):
        raise ValueError("grouped_attention: the head dim block must be a power of two")
    if out.dim() != 2 or out.shape[0] != batch * seq_len or out.stride(1) != 1:
        raise ValueError("grouped_attention: out must be [B * L, width] with unit column stride")
    if seqs.dtype != torch.int64 or not seqs.is_contiguous():
        raise ValueError("grouped_attention: seqs must be contiguous int64")
    if order.shape != (batch,) or row_config.shape != (batch,) or row_config.dtype != torch.int32:
        raise ValueError("grouped_attention: order [B] int64 and row_config [B] int32 expected")
    if out.dtype != qkv.dtype:
        raise ValueError("grouped_attention: out and qkv dtypes differ")
    block = max(16, min(64, triton.next_power_of_2(seq_len)))
    query_blocks = triton.cdiv(seq_len, block)
    grid = (batch * query_blocks * heads,)
    _grouped_attention_kernel[grid](
        qkv, out, out.stride(0), seqs, order, row_config, config_table,
        qkv.shape[2], seq_len, layer,
        HEADS=heads,
        HEAD_DIM_PAD=head_dim_pad,
        QUERY_BLOCKS=query_blocks,
        PRECISION=precision,
        BLOCK_M=block,
        BLOCK_N=block,
        num_warps=4,
    )
    return out
