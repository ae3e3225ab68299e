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

__all__ = ["Plan", "plan", "plan_reference", "score_topk", "score_topk_reference"]


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


def _validate(
    config_ids: Tensor, config_table: Tensor, check_ids: bool, max_depth: int | None
) -> None:
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
    if max_depth is not None and (
        isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0
    ):
        raise ValueError(f"plan: max_depth must be an int >= 0 or None, got {max_depth!r}")
    if max_depth is not None and config_table.device.type == "cpu":
        table_depth = max(int(config_table[:, 0].max()), 0)
        if max_depth != table_depth:
            raise ValueError(
                f"plan: max_depth must equal the table's largest depth {table_depth}, got "
                f"{max_depth}"
            )
    if check_ids and config_ids.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(config_ids))
        if lo < 0 or hi >= num_configs:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"plan: config_ids must be in [0, {num_configs}), got a value of {bad}"
            )


def plan_reference(
    config_ids: Tensor,
    config_table: Tensor,
    *,
    check_ids: bool = True,
    max_depth: int | None = None,
) -> Plan:
    """Pure-PyTorch :func:`plan` (composite-key stable sorts): the same arguments, checks
    and results; the test oracle. ``max_depth`` is validated as there, but the reference
    reads the depth from the table (config_table ``[C, 3]``, config_ids ``[B]``)."""
    _validate(config_ids, config_table, check_ids, max_depth)
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


def plan(
    config_ids: Tensor,
    config_table: Tensor,
    *,
    check_ids: bool = True,
    max_depth: int | None = None,
) -> Plan:
    """Group a batch of users by architecture: see :class:`Plan` for the outputs.

    Args:
        config_ids: [B] int64 in [0, C), config of each user.
        config_table: [C, 3] int64, row c = (depth, hidden, emb) of config c, same device.
        check_ids: check the ids' range in Python. On GPU tensors that costs a device->host
            sync; callers whose ids come from the router (always in range) may pass False.
        max_depth: the table's largest depth (``RoutingSpace.max_depth``), the length of
            ``layer_active``. None reads it from the table: on GPU tensors a device->host sync,
            so pass it where the plan must stay asynchronous (CUDA graphs). A wrong value is
            caught on CPU tables only.

    Raises:
        ValueError: on a wrong dtype, shape, device mix, max_depth or (with check_ids)
            out-of-range id.
    """
    _validate(config_ids, config_table, check_ids, max_depth)
    if _ext.has_kernel("plan", config_ids.device.type):
        depth = -1 if max_depth is None else max_depth
        return Plan(*torch.ops.canet.plan(config_ids, config_table, depth))
    return plan_reference(config_ids, config_table, check_ids=False)


# --- score_topk ---------------------------------------------------------------------------------

SCORE_TOPK_MAX_K = 200
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate_score_topk(
    hidden: Tensor,
    hidden_sizes: Tensor,
    weight: Tensor,
    bias: Tensor,
    history: Tensor | None,
    k: int,
    check_values: bool,
) -> Tensor | None:
    """Raise ValueError on bad inputs; returns history, None when nothing is excluded."""
    named = {"hidden": hidden, "hidden_sizes": hidden_sizes, "weight": weight, "bias": bias}
    if history is not None:
        named["history"] = history
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"score_topk: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _SCORE_DTYPES:
        raise ValueError(
            "score_topk: hidden must be float32, float16, bfloat16 or float64, got "
            f"{hidden.dtype}"
        )
    if hidden.dtype == torch.float64 and hidden.device.type != "cpu":
        raise ValueError(f"score_topk: float64 is supported on CPU only, got {hidden.device}")
    for name in ("weight", "bias"):
        if named[name].dtype != hidden.dtype:
            raise ValueError(
                f"score_topk: {name} must have hidden's dtype {hidden.dtype}, got "
                f"{named[name].dtype}"
            )
    if hidden.dim() != 2:
        raise ValueError(
            f"score_topk: hidden must be 2-D [B, h_max], got shape {tuple(hidden.shape)}"
        )
    batch = hidden.shape[0]
    if hidden_sizes.dtype != torch.int64:
        raise ValueError(f"score_topk: hidden_sizes must be int64, got {hidden_sizes.dtype}")
    if hidden_sizes.shape != (batch,):
        raise ValueError(
            f"score_topk: hidden_sizes must be [B] = [{batch}], got shape "
            f"{tuple(hidden_sizes.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] < 2:
        raise ValueError(
            f"score_topk: weight must be [N+1, H] with N >= 1, got shape {tuple(weight.shape)}"
        )
    rows = weight.shape[0]
    if bias.shape != (rows,):
        raise ValueError(
            f"score_topk: bias must be [N+1] = [{rows}], got shape {tuple(bias.shape)}"
        )
    num_items = rows - 1
    max_k = min(SCORE_TOPK_MAX_K, num_items)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise ValueError(f"score_topk: k must be an int in [1, {max_k}], got {k!r}")
    for name, t in named.items():
        if t.device != hidden.device:
            raise ValueError(
                f"score_topk: {name} must be on hidden's device {hidden.device}, got {t.device}"
            )
    if history is not None:
        if history.dtype != torch.int64:
            raise ValueError(f"score_topk: history must be int64, got {history.dtype}")
        if history.numel() == 0:
            history = None
        elif history.dim() != 2 or history.shape[0] != batch:
            raise ValueError(
                f"score_topk: history must be [B, L] = [{batch}, L], got shape "
                f"{tuple(history.shape)}"
            )
    if check_values and batch > 0:
        h_cap = min(hidden.shape[1], weight.shape[1])
        lo, hi = (int(v) for v in torch.aminmax(hidden_sizes))
        if lo < 0 or hi > h_cap:
            raise ValueError(
                f"score_topk: hidden_sizes must be in [0, min(h_max, H)] = [0, {h_cap}], got "
                f"a value of {lo if lo < 0 else hi}"
            )
        if history is not None:
            lo, hi = (int(v) for v in torch.aminmax(history))
            if lo < 0 or hi > num_items:
                raise ValueError(
                    f"score_topk: history ids must be in [0, {num_items}] (0 = padding), got "
                    f"a value of {lo if lo < 0 else hi}"
                )
    return history


def score_topk_reference(
    hidden: Tensor,
    hidden_sizes: Tensor,
    weight: Tensor,
    bias: Tensor,
    history: Tensor | None = None,
    k: int = 10,
    *,
    check_values: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`score_topk` (full score matrix, stable sorts); same contract.

    Scores are computed in float32 (float64 for float64 inputs) on each distinct hidden size's
    slice, so the values beyond a user's size are never read.
    """
    history = _validate_score_topk(
        hidden, hidden_sizes, weight, bias, history, k, check_values
    )
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch, rows = hidden.shape[0], weight.shape[0]
    scores = torch.empty(batch, rows, dtype=acc, device=hidden.device)
    for size in torch.unique(hidden_sizes).tolist():
        users = (hidden_sizes == size).nonzero().squeeze(1)
        x = hidden[users, :size].to(acc)
        scores[users] = x @ weight[:, :size].to(acc).T + bias.to(acc)
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    candidate = torch.ones(batch, rows, dtype=torch.bool, device=hidden.device)
    candidate[:, 0] = False
    if history is not None:
        candidate.scatter_(1, history, False)
    # Stable sorts keep ascending item ids among equal scores; the second one moves the
    # non-candidates behind every candidate without disturbing that order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = order.gather(
        1, torch.sort(candidate.gather(1, order).to(torch.uint8), dim=1, descending=True,
                      stable=True).indices
    )[:, :k]
    ids = torch.where(candidate.gather(1, order), order, -1)
    top = torch.where(ids >= 0, scores.gather(1, order), float("-inf"))
    return ids, top


def score_topk(
    hidden: Tensor,
    hidden_sizes: Tensor,
    weight: Tensor,
    bias: Tensor,
    history: Tensor | None = None,
    k: int = 10,
    *,
    check_values: bool = True,
) -> tuple[Tensor, Tensor]:
    """Top-k items per user from the last position's hidden states, without materialising the
    ``[B, N+1]`` score matrix on the native paths.

    User b's score of item i is ``hidden[b, :h] . weight[i, :h] + bias[i]`` with
    ``h = hidden_sizes[b]``: ``hidden[b, h:]`` is ignored (it may hold anything, NaN included).
    On CUDA ``weight[i, h:]`` is multiplied by zero rather than skipped, so it must be finite
    (any trained output layer is); on CPU its values never change the result.

    Args:
        hidden: [B, h_max] float32/float16/bfloat16 (float64 on CPU only).
        hidden_sizes: [B] int64 in [0, min(h_max, H)].
        weight: [N+1, H], the output layer (row 0 = padding item), same dtype; read in place.
        bias: [N+1], same dtype.
        history: [B, L] int64 item ids in [0, N] to exclude (0 = padding), or None / an empty
            tensor to exclude nothing.
        k: 1 <= k <= min(200, N).
        check_values: check hidden_sizes' and history's ranges in Python (a device->host sync
            on GPU tensors). Without it the CUDA kernel clamps sizes (the CPU kernel still
            raises), and both kernels ignore history ids outside [1, N].

    Returns:
        ``(ids, scores)``, ``[B, k]`` each, best first: ids int64 over items 1..N (item 0 and
        excluded items are never returned); scores float32 (float64 for float64 inputs),
        accumulated in that precision, never requiring grad. On CPU a score is the same bits
        whatever the batch, thread count or item position, so equal weight rows tie exactly.
        Ties are broken by the smaller item id; a NaN score ranks as -inf. A user with fewer
        than k candidates gets id -1 and score -inf in the remaining slots.

    Raises:
        ValueError: on a wrong dtype, shape, device mix, k, or (with check_values) value range.
    """
    history = _validate_score_topk(
        hidden, hidden_sizes, weight, bias, history, k, check_values
    )
    with torch.no_grad():  # a selection: not differentiable, whichever path runs
        if _ext.has_kernel("score_topk", hidden.device.type):
            return torch.ops.canet.score_topk(hidden, hidden_sizes, weight, bias, history, k)
        return score_topk_reference(
            hidden, hidden_sizes, weight, bias, history, k, check_values=False
        )
