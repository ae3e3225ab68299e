"""Inference FLOPs of one user, counted as 2 per multiply-add (the matmuls; norms, softmax and
activations are left out, as FLOP counters do).

For config (d, h, e), sequence length L and N items (N+1 output rows, padding included):

* input projection: ``2 L e h``
* each of the d blocks: QKV ``6 L h^2``, attention scores and weighted values ``4 L^2 h`` (the
  dense causal computation over all L x L pairs), output projection ``2 L h^2``, FFN
  ``16 L h^2`` -> ``24 L h^2 + 4 L^2 h``
* output layer at the last position only: ``2 h (N + 1)``

The router (one block of width r, last position to C logits): ``24 L r^2 + 4 L^2 r + 2 r C``.

A routed batch costs the sum over its users (:func:`batch_flops`): the one count the engine's
plan summary, evaluation and the benchmarks report.
"""

from __future__ import annotations

from collections.abc import Sequence

from .space import Config, RoutingSpace

__all__ = ["batch_flops", "config_flops", "flops", "flops_router"]


def _block_flops(seq_len: int, width: int) -> int:
    return 24 * seq_len * width * width + 4 * seq_len * seq_len * width


def flops(config: Config, seq_len: int, num_items: int) -> int:
    """Inference FLOPs for one user routed to ``config`` (see the module docstring)."""
    if seq_len < 1 or num_items < 1:
        raise ValueError(f"seq_len and num_items must be >= 1, got {seq_len}, {num_items}")
    h, e = config.hidden, config.emb
    return (
        2 * seq_len * e * h
        + config.depth * _block_flops(seq_len, h)
        + 2 * h * (num_items + 1)
    )


def flops_router(seq_len: int, n_configs: int, dim: int = 32) -> int:
    """Inference FLOPs of the router for one user."""
    if seq_len < 1 or n_configs < 1:
        raise ValueError(f"seq_len and n_configs must be >= 1, got {seq_len}, {n_configs}")
    return _block_flops(seq_len, dim) + 2 * dim * n_configs


def config_flops(space: RoutingSpace, seq_len: int, num_items: int) -> list[int]:
    """Inference FLOPs of one user of each config of ``space``, in config-id order."""
    return [flops(c, seq_len, num_items) for c in space.configs]


def batch_flops(
    histogram: Sequence[int], space: RoutingSpace, seq_len: int, num_items: int
) -> int:
    """Supernet FLOPs of a batch with ``histogram[c]`` users routed to config id ``c`` (router
    excluded). ``histogram`` has one count per config, e.g.
    ``torch.bincount(config_ids, minlength=len(space)).tolist()``."""
    if len(histogram) != len(space):
        raise ValueError(
            f"histogram must have one count per config ({len(space)}), got {len(histogram)}"
        )
    per_config = config_flops(space, seq_len, num_items)
    return sum(int(n) * f for n, f in zip(histogram, per_config, strict=True))
