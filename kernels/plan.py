"""Device-side plan: counting sort of users by architecture, group table and tile tables.

One single-program launch turns a batch's routing into everything the grouped kernels read,
without a host sync (so a CUDA graph can capture it), into preallocated fixed-capacity buffers
(the vLLM ``moe_align_block_size`` / LoRA-metadata pattern):

* ``order [B]``: original user of each sorted row (stable counting sort by group rank, the
  groups ordered by (depth desc, hidden, emb, config id)); only written in sort mode, otherwise
  the caller's plan is used as is.
* ``row_config [B]`` int32: config id of each sorted row (the attention kernel reads it).
* ``tiles [token_capacity + last_capacity, 3]`` int64 rows ``(config id, row start, row end)``:
  first the *token tiles* (rows are ``user * L + t``, ``TILE_ROWS`` per tile, never straddling
  two groups), then at ``token_capacity`` the *last tiles* (rows are sorted users; a user's row
  stands for its last position ``user * L + L - 1``). Deepest groups come first, so the tiles
  active at layer ``i`` are a prefix and one table serves every layer.
* ``ranges [2 * D + 2, 3]`` int32 rows ``(token tiles, last begin, last end)``: which tiles each
  grouped launch runs (see :func:`launch_row`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["TILE_ROWS", "PlanBuffers", "build_plan", "launch_row", "tile_capacities"]

# Rows per tile in both tables; every grouped GEMM uses BLOCK_M == TILE_ROWS.
TILE_ROWS = 64


def tile_capacities(batch: int, seq_len: int, num_configs: int) -> tuple[int, int]:
    """Upper bounds on (token tiles, last tiles) for any routing of ``batch`` users: each group
    wastes at most one partial tile."""
    return triton.cdiv(batch * seq_len, TILE_ROWS) + num_configs, (
        triton.cdiv(batch, TILE_ROWS) + num_configs
    )


def launch_row(kind: str, layer: int = 0, max_depth: int = 0) -> int:
    """Row of ``ranges`` for one grouped launch.

    kind "embed": token tiles of every group; "qkv": token tiles of groups with depth > layer;
    "dense" (attention output, FFN1, FFN2): token tiles of groups with depth > layer + 1 plus
    the last tiles of groups whose final block is ``layer``; "output": last tiles of every group.
    """
    if kind == "embed":
        return 0
    if kind == "qkv":
        return 1 + 2 * layer
    if kind == "dense":
        return 2 + 2 * layer
    if kind == "output":
        return 1 + 2 * max_depth
    raise ValueError(f"unknown launch kind {kind!r}")


@triton.jit
def _user_groups(config_ids_ptr, config_rank_ptr, start, num_users, groups,
                 BLOCK_USERS: tl.constexpr, GROUPS_PAD: tl.constexpr):
    """Users ``start + [0, BLOCK_USERS)``: (ids, in-batch mask, one-hot of their group
    ``[BLOCK_USERS, GROUPS_PAD]`` int64). Lanes past the batch get the out-of-range group
    GROUPS_PAD, which matches no column."""
    users = start + tl.arange(0, BLOCK_USERS)
    in_batch = users < num_users
    config = tl.load(config_ids_ptr + users, mask=in_batch, other=0)
    group = tl.load(config_rank_ptr + config, mask=in_batch, other=GROUPS_PAD)
    return users, in_batch, (group[:, None] == groups[None, :]).to(tl.int64)


# Not specialized (16-divisibility, == 1, 16-byte alignment): the batch-dependent ints, seq_len
# and num_configs (constants save nothing here) and config_ids (the engine passes row slices of
# a batch's ids). One compile serves every batch size and slice.
@triton.jit(
    do_not_specialize=["num_users", "num_configs", "seq_len", "token_capacity"],
    do_not_specialize_on_alignment=["config_ids_ptr"],
)
def _plan_kernel(
    config_ids_ptr,  # [B] int64 (sort mode)
    config_rank_ptr,  # [C] int32: group index of each config id (sort mode)
    group_config_ptr,  # [C] int64: config id of each group
    group_offsets_ptr,  # [C + 1] int64: written in sort mode, read otherwise
    order_ptr,  # [B] int64: written in sort mode
    row_config_ptr,  # [B] int32 out
    config_table_ptr,  # [C, 3] int32 (depth, hidden, emb)
    tiles_ptr,  # [token_capacity + last_capacity, 3] int64 out
    ranges_ptr,  # [2 * MAX_DEPTH + 2, 3] int32 out
    num_users,
    num_configs,
    seq_len,
    token_capacity,
    SORT: tl.constexpr,
    MAX_DEPTH: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    BLOCK_USERS: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
    TILE: tl.constexpr,
):
    groups = tl.arange(0, GROUPS_PAD)
    group_valid = groups < num_configs

    if SORT:
        # Pass 1: users per group.
        counts = tl.zeros([GROUPS_PAD], dtype=tl.int64)
        for start in range(0, num_users, BLOCK_USERS):
            users, in_batch, one_hot = _user_groups(
                config_ids_ptr, config_rank_ptr, start, num_users, groups, BLOCK_USERS, GROUPS_PAD
            )
            counts += tl.sum(one_hot, axis=0)
        offsets = tl.cumsum(counts, axis=0) - counts
        tl.store(group_offsets_ptr + groups, offsets, mask=group_valid)
        tl.store(group_offsets_ptr + num_configs, tl.sum(counts, axis=0))
        # Pass 2: a user's sorted row = its group's cursor + the users of the same group before
        # it in this chunk; chunks in input order keep the sort stable.
        cursor = offsets
        for start in range(0, num_users, BLOCK_USERS):
            users, in_batch, one_hot = _user_groups(
                config_ids_ptr, config_rank_ptr, start, num_users, groups, BLOCK_USERS, GROUPS_PAD
            )
            before = tl.cumsum(one_hot, axis=0) - one_hot
            row = tl.sum(one_hot * (cursor[None, :] + before), axis=1)
            tl.store(order_ptr + row, users.to(tl.int64), mask=in_batch)
            cursor += tl.sum(one_hot, axis=0)
    else:
        starts = tl.load(group_offsets_ptr + groups, mask=group_valid, other=0)
        ends = tl.load(group_offsets_ptr + groups + 1, mask=group_valid, other=0)
        offsets = starts
        counts = ends - starts

    group_config = tl.load(group_config_ptr + groups, mask=group_valid, other=0)
    depth = tl.load(config_table_ptr + group_config * 3, mask=group_valid, other=0)
    token_tiles = tl.where(group_valid, tl.cdiv(counts * seq_len, TILE), 0)
    last_tiles = tl.where(group_valid, tl.cdiv(counts, TILE), 0)
    token_first = tl.cumsum(token_tiles, axis=0) - token_tiles
    last_first = tl.cumsum(last_tiles, axis=0) - last_tiles

    # Launch ranges. Groups are sorted by depth descending, so "depth > i" selects a prefix of
    # both tables and "depth == i + 1" a contiguous run of last tiles.
    token_all = tl.sum(token_tiles, axis=0)
    last_all = tl.sum(last_tiles, axis=0)
    tl.store(ranges_ptr + 0, token_all.to(tl.int32))
    tl.store(ranges_ptr + 1, 0)
    tl.store(ranges_ptr + 2, 0)
    for layer in tl.static_range(MAX_DEPTH):
        token_deeper = tl.sum(tl.where(depth > layer, token_tiles, 0), axis=0)
        token_beyond = tl.sum(tl.where(depth > layer + 1, token_tiles, 0), axis=0)
        last_deeper = tl.sum(tl.where(depth > layer, last_tiles, 0), axis=0)
        last_beyond = tl.sum(tl.where(depth > layer + 1, last_tiles, 0), axis=0)
        qkv_row = ranges_ptr + (1 + 2 * layer) * 3
        tl.store(qkv_row + 0, token_deeper.to(tl.int32))
        tl.store(qkv_row + 1, 0)
        tl.store(qkv_row + 2, 0)
        dense_row = ranges_ptr + (2 + 2 * layer) * 3
        tl.store(dense_row + 0, token_beyond.to(tl.int32))
        tl.store(dense_row + 1, last_beyond.to(tl.int32))
        tl.store(dense_row + 2, last_deeper.to(tl.int32))
    output_row = ranges_ptr + (1 + 2 * MAX_DEPTH) * 3
    tl.store(output_row + 0, 0)
    tl.store(output_row + 1, 0)
    tl.store(output_row + 2, last_all.to(tl.int32))

    # Tile tables and the per-row config, group by group (scalars picked out of the vectors).
    for g in range(0, num_configs):
        pick = groups == g
        config = tl.sum(tl.where(pick, group_config, 0), axis=0)
        first_user = tl.sum(tl.where(pick, offsets, 0), axis=0)
        # Loop bounds in int32 (a loop variable keeps one type); counts of users/tiles fit.
        users = tl.sum(tl.where(pick, counts, 0), axis=0).to(tl.int32)
        n_token = tl.sum(tl.where(pick, token_tiles, 0), axis=0).to(tl.int32)
        n_last = tl.sum(tl.where(pick, last_tiles, 0), axis=0).to(tl.int32)
        token_base = tl.sum(tl.where(pick, token_first, 0), axis=0)
        last_base = tl.sum(tl.where(pick, last_first, 0), axis=0) + token_capacity
        token_end = (first_user + users) * seq_len
        for start in range(0, n_token, BLOCK_TILES):
            tile = start + tl.arange(0, BLOCK_TILES)
            live = tile < n_token
            row_start = first_user * seq_len + tile.to(tl.int64) * TILE
            entry = tiles_ptr + (token_base + tile).to(tl.int64) * 3
            tl.store(entry + 0, config + tl.zeros_like(row_start), mask=live)
            tl.store(entry + 1, row_start, mask=live)
            tl.store(entry + 2, tl.minimum(row_start + TILE, token_end), mask=live)
        for start in range(0, n_last, BLOCK_TILES):
            tile = start + tl.arange(0, BLOCK_TILES)
            live = tile < n_last
            row_start = first_user + tile.to(tl.int64) * TILE
            entry = tiles_ptr + (last_base + tile).to(tl.int64) * 3
            tl.store(entry + 0, config + tl.zeros_like(row_start), mask=live)
            tl.store(entry + 1, row_start, mask=live)
            tl.store(entry + 2, tl.minimum(row_start + TILE, first_user + users), mask=live)
        for start in range(0, users, BLOCK_USERS):
            row = start + tl.arange(0, BLOCK_USERS)
            tl.store(
                row_config_ptr + first_user + row,
                (config + tl.zeros_like(row)).to(tl.int32),
                mask=row < users,
            )


class PlanBuffers:
    """Fixed-capacity device buffers of one batch size, reused batch after batch (and captured
    by CUDA graphs, whose replays must see the same addresses)."""

    def __init__(
        self, batch: int, seq_len: int, num_configs: int, max_depth: int, device: torch.device
    ) -> None:
        token_capacity, last_capacity = tile_capacities(batch, seq_len, num_configs)
        self.batch = batch
        self.seq_len = seq_len
        self.max_depth = max_depth
        self.token_capacity = token_capacity
        self.order = torch.empty(batch, dtype=torch.int64, device=device)
        self.group_offsets = torch.empty(num_configs + 1, dtype=torch.int64, device=device)
        self.row_config = torch.empty(batch, dtype=torch.int32, device=device)
        self.tiles = torch.empty(
            token_capacity + last_capacity, 3, dtype=torch.int64, device=device
        )
        self.ranges = torch.empty(2 * max_depth + 2, 3, dtype=torch.int32, device=device)


def build_plan(
    buffers: PlanBuffers,
    config_table: torch.Tensor,
    group_config: torch.Tensor,
    *,
    config_ids: torch.Tensor | None = None,
    config_rank: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    group_offsets: torch.Tensor | None = None,
) -> None:
    """Fill ``buffers`` for one batch in one launch.

    Sort mode (``config_ids [B]`` int64 and ``config_rank [C]`` int32 given): the counting sort
    writes ``buffers.order`` and ``buffers.group_offsets``. Plan mode (``order [B]`` and
    ``group_offsets [C+1]`` from :func:`canet.ops.plan` given): only the tables are built.

    config_table ``[C, 3]`` int32 (depth, hidden, emb); group_config ``[C]`` int64, the config
    of each group in execution order (depth descending first). Ids are not range-checked here
    (that would need a sync): the caller validates them, or they come from the router.
    """
    num_configs = config_table.shape[0]
    sort = config_ids is not None
    if sort == (order is not None or group_offsets is not None):
        raise ValueError("build_plan: pass config_ids and config_rank, or order and group_offsets")
    _check(config_table, (num_configs, 3), torch.int32, "config_table")
    _check(group_config, (num_configs,), torch.int64, "group_config")
    if sort:
        _check(config_ids, (buffers.batch,), torch.int64, "config_ids")
        _check(config_rank, (num_configs,), torch.int32, "config_rank")
        order, group_offsets = buffers.order, buffers.group_offsets
    else:
        _check(order, (buffers.batch,), torch.int64, "order")
        _check(group_offsets, (num_configs + 1,), torch.int64, "group_offsets")
    dummy = buffers.row_config  # never read for the unused mode's pointers
    _plan_kernel[(1,)](
        config_ids if sort else dummy,
        config_rank if sort else dummy,
        group_config,
        group_offsets,
        order,
        buffers.row_config,
        config_table,
        buffers.tiles,
        buffers.ranges,
        buffers.batch,
        num_configs,
        buffers.seq_len,
        buffers.token_capacity,
        SORT=sort,
        MAX_DEPTH=buffers.max_depth,
        GROUPS_PAD=triton.next_power_of_2(num_configs),
        BLOCK_USERS=128,
        BLOCK_TILES=128,
        TILE=TILE_ROWS,
        num_warps=4,
    )


def _check(tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(
            f"build_plan: {name} must be a contiguous {dtype} tensor of shape {shape}, got "
            f"{tensor.dtype} {tuple(tensor.shape)} (contiguous={tensor.is_contiguous()})"
        )
