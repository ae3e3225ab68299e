"""Boundary validation shared by the model and every engine backend.

Each check raises ``ValueError`` saying what was expected and what came, so a bad batch fails
the same way whichever backend it reaches.
"""

from __future__ import annotations

import torch

__all__ = ["check_sequences", "check_config_ids", "check_choice"]

_ID_DTYPES = (torch.int64, torch.int32)


def check_sequences(
    seqs: object, num_items: int, max_len: int, *, need_last_item: bool = True
) -> torch.Tensor:
    """Validate a batch of left-padded item-id sequences and return it as int64 ``[B, L]``.

    Ids are 1..num_items, 0 is padding. With ``need_last_item`` the last position of every
    row must hold a real item: that is where the model predicts from, so an all-padding or
    right-padded row cannot be scored.
    """
    if not isinstance(seqs, torch.Tensor):
        raise ValueError(
            f"seqs must be a torch.Tensor of item ids [B, {max_len}], got {type(seqs)}"
        )
    if seqs.dtype not in _ID_DTYPES:
        raise ValueError(f"seqs must hold int64 (or int32) item ids, got dtype {seqs.dtype}")
    if seqs.dim() != 2:
        raise ValueError(f"seqs must be 2-D [B, {max_len}], got shape {tuple(seqs.shape)}")
    batch, length = seqs.shape
    if batch == 0:
        raise ValueError("seqs is an empty batch (0 rows); at least one sequence is needed")
    if length != max_len:
        raise ValueError(
            f"seqs must have length max_len={max_len} (left-padded with 0), got length {length}"
        )
    lo, hi = int(seqs.min()), int(seqs.max())
    if lo < 0 or hi > num_items:
        raise ValueError(
            f"item ids must be in [0, {num_items}] (0 = padding), got values in [{lo}, {hi}]"
        )
    if need_last_item:
        ends_in_padding = (seqs[:, -1] == 0).nonzero().flatten()
        if ends_in_padding.numel():
            rows = ends_in_padding[:5].tolist()
            extra = ends_in_padding.numel() - 5
            more = f" and {extra} more" if extra > 0 else ""
            raise ValueError(
                "every sequence must be left-padded with a real item at the last position; "
                f"rows {rows}{more} end with padding (0)"
            )
    return seqs.long()


def check_config_ids(config_ids: object, batch: int, n_configs: int) -> torch.Tensor:
    """Validate per-user config ids ``[B]`` in ``[0, n_configs)`` and return them as int64."""
    if not isinstance(config_ids, torch.Tensor):
        raise ValueError(f"config_ids must be a torch.Tensor [B={batch}], got {type(config_ids)}")
    if config_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"config_ids must be int64 (or int32), got dtype {config_ids.dtype}")
    if config_ids.shape != (batch,):
        raise ValueError(
            f"config_ids must have shape [B] = ({batch},), got {tuple(config_ids.shape)}"
        )
    if batch:
        lo, hi = int(config_ids.min()), int(config_ids.max())
        if lo < 0 or hi >= n_configs:
            raise ValueError(
                f"config ids must be in [0, {n_configs - 1}], got values in [{lo}, {hi}]"
            )
    return config_ids.long()


def check_choice(choice: object, batch: int, n_configs: int) -> torch.Tensor:
    """Validate routing weights ``[B, n_configs]`` (one-hot, or straight-through one-hot)."""
    if not isinstance(choice, torch.Tensor):
        raise ValueError(f"choice must be a torch.Tensor [B, {n_configs}], got {type(choice)}")
    if not choice.is_floating_point():
        raise ValueError(
            f"choice must be a floating-point one-hot tensor, got dtype {choice.dtype}"
        )
    if choice.shape != (batch, n_configs):
        raise ValueError(
            f"choice must have shape [B, n_configs] = ({batch}, {n_configs}), "
            f"got {tuple(choice.shape)}"
        )
    if not torch.isfinite(choice).all():
        raise ValueError("choice holds NaN or inf")
    return choice
