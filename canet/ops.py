"""Operators of the canet engine, with pure-PyTorch references.

:func:`plan` dispatches to the native ``torch.ops.canet.plan`` when the extension is loaded
and has a kernel for the tensors' device, and to :func:`plan_reference` otherwise; the two
give identical results (the reference is the test oracle).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from canet import _ext

__all__ = ["Plan", "plan", "plan_reference"]


class Plan(NamedTuple):
    """Once-per-batch grouping of users by architecture (all int64, on the inputs' device).

    Groups are one per config (C of them, empty ones included), ordered by
    (depth descending, hidden, emb, config id ascending).

    order:         [B]   original user index at each sorted row; stable within a group.
    inverse:       [B]   sorted row of each user: ``inverse[order[r]] == r``.
    group_config:  [C]   config id of group g.
    group_offsets: [C+1] exclusive cumsum of group sizes; group g is rows
                         ``group_offsets[g]:group_offsets[g+1]``, and ``group_offsets[C] == B``.
    layer_active:  [max_depth] users whose depth > i; they are sorted rows
                         ``0:layer_active[i]`` because the deepest groups come first.
    """

    order: Tensor
    inverse: Tensor
    group_config: Tensor
    group_offsets: Tensor
    layer_active: Tensor


def _validate(config_ids: Tensor, config_table: Tensor, check_ids: bool) -> None:
    if not isinstance(config_ids, Tensor) or not isinstance(config_table, Tensor):
        raise ValueError(
            "plan: config_ids and config_table must be torch.Tensor, got "
            f"{type(config_ids).__name__} and {type(config_table).__name__}"
        )
    if config_ids.dtype != torch.int64:
        raise ValueError(f"plan: config_ids must be int64, got {config_ids.dtype}")
    if config_table.dtype != torch.int64:
        raise ValueError(f"plan: config_table must be int64, got {config_table.dtype}")
    if config_ids.dim() != 1:
        raise ValueError(f"plan: config_ids must be 1-D [B], got shape {tuple(config_ids.shape)}")
    if config_table.dim() != 2 or config_table.shape[1] != 3:
        raise ValueError(
            "plan: config_table must be [C, 3] (depth, hidden, emb), got shape "
            f"{tuple(config_table.shape)}"
        )
    num_configs = config_table.shape[0]
    if num_configs < 1:
        raise ValueError("plan: config_table must have at least one config (C >= 1), got C = 0")
    if config_ids.device != config_table.device:
        raise ValueError(
            "plan: config_ids and config_table must be on the same device, got "
            f"{config_ids.device} and {config_table.device}"
        )
    if check_ids and config_ids.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(config_ids))
        if lo < 0 or hi >= num_configs:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"plan: config_ids must be in [0, {num_configs}), got a value of {bad}"
            )


def plan_reference(config_ids: Tensor, config_table: Tensor, *, check_ids: bool = True) -> Plan:
    """Pure-PyTorch :func:`plan` (composite-key stable sorts); same contract and results.

    Args:
        config_ids: [B] int64 in [0, C), config of each user.
        config_table: [C, 3] int64, row c = (depth, hidden, emb) of config c, same device.
        check_ids: check the ids' range (one device->host sync on GPU tensors).
    """
    _validate(config_ids, config_table, check_ids)
    device = config_ids.device
    num_configs = config_table.shape[0]
    batch = config_ids.shape[0]
    depth, hidden, emb = config_table.unbind(1)

    # Stable sorts from the least to the most significant key give the lexicographic order.
    group_config = torch.arange(num_configs, device=device)
    for key in (emb, hidden, -depth):
        group_config = group_config[torch.sort(key[group_config], stable=True).indices]
    group_rank = torch.empty_like(group_config)
    group_rank[group_config] = torch.arange(num_configs, device=device)

    user_group = group_rank[config_ids]
    order = torch.sort(user_group, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch, device=device)

    sizes = torch.bincount(config_ids, minlength=num_configs)  # per config id
    group_offsets = torch.zeros(num_configs + 1, dtype=torch.int64, device=device)
    group_offsets[1:] = torch.cumsum(sizes[group_config], 0)

    max_depth = max(int(depth.max()), 0)
    layers = torch.arange(max_depth, device=device)
    layer_active = ((depth[None, :] > layers[:, None]).to(torch.int64) * sizes[None, :]).sum(1)
    return Plan(order, inverse, group_config, group_offsets, layer_active)


def plan(config_ids: Tensor, config_table: Tensor, *, check_ids: bool = True) -> Plan:
    """Group a batch of users by architecture: see :class:`Plan` for the outputs.

    Args:
        config_ids: [B] int64 in [0, C), config of each user.
        config_table: [C, 3] int64, row c = (depth, hidden, emb) of config c, same device.
        check_ids: check the ids' range in Python. On GPU tensors that costs a device->host
            sync; callers whose ids come from the router (always in range) may pass False.

    Raises:
        ValueError: on a wrong dtype, shape, device mix or (with check_ids) out-of-range id.
    """
    _validate(config_ids, config_table, check_ids)
    if _ext.has_kernel("plan", config_ids.device.type):
        return Plan(*torch.ops.canet.plan(config_ids, config_table))
    return plan_reference(config_ids, config_table, check_ids=False)
