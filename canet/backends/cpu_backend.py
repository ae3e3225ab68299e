"""The native CPU engine backend: the whole routed forward of a batch in one C++ call.

``canet::routed_scores`` runs every group of the plan in parallel work items (a run of one
group's users each), with GEMMs on prefix views of the max-size weights, fused attention,
bias/GELU and residual/LayerNorm, and the last block and output layer on the last position
only. ``canet::router_logits`` runs the router with the same block code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..ops import Plan
from ..space import RoutingSpace

__all__ = ["Backend", "DTYPES", "requirements"]

# Compute dtypes this backend supports (checked by canet.backends.resolve).
DTYPES = (torch.float32, torch.float64)

_BLOCK_KEYS = (
    "attn.qkv.weight", "attn.qkv.bias", "attn.out.weight", "attn.out.bias",
    "ln1.weight", "ln1.bias", "ffn.fc1.weight", "ffn.fc1.bias",
    "ffn.fc2.weight", "ffn.fc2.bias", "ln2.weight", "ln2.bias",
)


def requirements(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cpu":
        return (
            f"the cpu backend runs on CPU tensors only, and the model is on {device}; "
            "move it with model.cpu() to use it"
        )
    if not _ext.has_kernel("routed_scores", "cpu"):
        why = _ext.reason() or "canet._C is loaded but has no CPU kernel for canet::routed_scores"
        return (
            f"the native extension is unavailable ({why}); build it from a checkout with "
            "`pip install --no-build-isolation -e .` (or `make test`)"
        )
    return None


def _block(state: dict[str, Tensor], prefix: str, scales: tuple[Tensor, Tensor]) -> list[Tensor]:
    return [state[prefix + key] for key in _BLOCK_KEYS] + list(scales)


class Backend:
    """Holds references to the state_dict's tensors (no copies) in the op's weight order."""

    name = "cpu"

    def __init__(self, arch: dict, state: dict[str, Tensor], device: torch.device) -> None:
        reason = requirements(device)
        if reason is not None:
            raise RuntimeError(f"cpu backend: {reason}")
        space = RoutingSpace.from_dict(arch["space"])
        self.heads = space.heads
        self.router_heads = arch["router_heads"]
        self.table = space.table("cpu")
        dtype = state["supernet.out.weight"].dtype
        # Shared 0-d ones for blocks without residual scaling; the scales of blocks with it
        # stay references, so in-place updates of the model are seen.
        one = torch.ones((), dtype=dtype)
        weights = [
            state["supernet.item_emb.weight"], state["supernet.pos_emb.weight"],
            state["supernet.in_proj.weight"], state["supernet.in_proj.bias"],
        ]
        for i in range(space.max_depth):
            prefix = f"supernet.blocks.{i}."
            if arch["residual_scaling"]:
                scales = (state[prefix + "res_scale1"], state[prefix + "res_scale2"])
            else:
                scales = (one, one)
            weights += _block(state, prefix, scales)
        weights += [state["supernet.out.weight"], state["supernet.out.bias"]]
        self.weights = weights
        self.router_weights = (
            [state["router.item_emb.weight"], state["router.pos_emb.weight"]]
            + _block(state, "router.block.", (one, one))
            + [state["router.head.weight"], state["router.head.bias"]]
        )

    def route(self, seqs: Tensor) -> Tensor:
        """Argmax routing. seqs ``[B, L]`` -> config ids ``[B]``."""
        return self.router_logits(seqs).argmax(dim=-1)

    def router_logits(self, seqs: Tensor) -> Tensor:
        """Router logits ``[B, C]``. seqs ``[B, L]`` int64, validated by the caller."""
        return torch.ops.canet.router_logits(seqs, self.router_weights, self.router_heads)

    def scores(self, seqs: Tensor, plan: Plan, block_users: int = 0) -> Tensor:
        """Scores ``[B, N+1]`` (users in input order) following ``plan``. seqs ``[B, L]``."""
        return torch.ops.canet.routed_scores(
            seqs, plan.order, plan.group_config, plan.group_offsets, self.table,
            self.weights, self.heads, block_users,
        )

    def last_hidden(self, seqs: Tensor, plan: Plan, block_users: int = 0) -> Tensor:
        """The last position's hidden states ``[B, H]`` (input order), zero past each user's
        hidden size: :meth:`scores` without the output layer. seqs ``[B, L]``."""
        return torch.ops.canet.routed_last_hidden(
            seqs, plan.order, plan.group_config, plan.group_offsets, self.table,
            self.weights, self.heads, block_users,
        )

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """The output layer's weight ``[N+1, H]`` and bias ``[N+1]``."""
        return self.weights[-2], self.weights[-1]
