"""The native CPU engine backend: the whole routed forward of a batch in one C++ call.

``canet::routed_scores`` runs every group of the plan in parallel work items (a run of one
group's users each), with GEMMs on prefix views of the max-size weights, fused attention,
bias/GELU and residual/LayerNorm, and the last block and output layer on the last position
only. ``canet::router_logits`` runs the router with the same block code.

float32 engines also hold the supernet's GEMM weights packed once (``canet::pack_panels``, one
copy serving every config's prefix slice: the block weights' size again), which the op uses on
CPUs with AVX2 and FMA instead of letting MKL re-pack the weights on every call: at small
batches that re-packing and the per-GEMM dispatch cost about as much as the arithmetic. The
packs follow in-place updates of the model's weights: each call compares the weights' version
counters with those packed, and re-packs what changed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..model import BLOCK_PARAMS
from ..ops import Plan
from ..space import RoutingSpace
from . import base

__all__ = ["Backend"]


def _block(state: dict[str, Tensor], prefix: str, one: Tensor | None) -> list[Tensor]:
    """One block's tensors in the op's order (:data:`canet.model.BLOCK_PARAMS`). ``one``: the
    0-d ones standing for the residual scales of a block without them (None: it has them;
    they stay references, so in-place updates of the model are seen)."""
    return [
        one if one is not None and name.startswith("res_scale") else state[prefix + name]
        for name in BLOCK_PARAMS
    ]


class Backend(base.Backend):
    """Holds references to the state_dict's tensors (no copies) in the op's weight order."""

    NAME = "cpu"
    DEVICE_TYPES = ("cpu",)
    DEVICE_HINT = "move it with model.cpu() to use it"
    DTYPES = (torch.float32, torch.float64)
    LAST_HIDDEN = True

    @classmethod
    def _install_reasons(cls, device: torch.device) -> list[str]:
        if _ext.has_kernel("routed_scores", "cpu"):
            return []
        why = _ext.reason() or "canet._C is loaded but has no CPU kernel for canet::routed_scores"
        return [
            f"the native extension is unavailable ({why}); build it from a checkout with "
            "`pip install --no-build-isolation -e .` (or `make test`)"
        ]

    def __init__(self, arch: dict, state: dict[str, Tensor], device: torch.device) -> None:
        super().__init__(arch, state, device)
        space = RoutingSpace.from_dict(arch["space"])
        self.heads = space.heads
        self.router_heads = arch["router_heads"]
        self.table = space.table("cpu")
        # Shared 0-d ones for blocks without residual scaling.
        one = torch.ones((), dtype=self.dtype)
        scaled = None if arch["residual_scaling"] else one
        weights = [
            state["supernet.item_emb.weight"], state["supernet.pos_emb.weight"],
            state["supernet.in_proj.weight"], state["supernet.in_proj.bias"],
        ]
        for i in range(space.max_depth):
            weights += _block(state, f"supernet.blocks.{i}.", scaled)
        weights += [state["supernet.out.weight"], state["supernet.out.bias"]]
        self.weights = weights
        # (weight, first row, rows) of each packed GEMM weight, in the op's order.
        H = state["supernet.in_proj.weight"].shape[0]
        self._pack_sources: list[tuple[Tensor, int, int]] = [
            (state["supernet.in_proj.weight"], 0, H)]
        for i in range(space.max_depth):
            prefix = f"supernet.blocks.{i}."
            qkv = state[prefix + "attn.qkv.weight"]
            self._pack_sources += [
                (qkv, 0, H), (qkv, H, H), (qkv, 2 * H, H),
                (state[prefix + "attn.out.weight"], 0, H),
                (state[prefix + "ffn.fc1.weight"], 0, 4 * H),
                (state[prefix + "ffn.fc2.weight"], 0, H),
            ]
        # Inference tensors (weights made under torch.inference_mode) have no version counter
        # to follow: they are not packed.
        self._packable = self.dtype == torch.float32 and not any(
            w.is_inference() for w, _, _ in self._pack_sources)
        self._packed: list[Tensor] = []
        self._packed_versions: list[int] = []
        self.router_weights = (
            [state["router.item_emb.weight"], state["router.pos_emb.weight"]]
            + _block(state, "router.block.", one)
            + [state["router.head.weight"], state["router.head.bias"]]
        )

    def router_logits(self, seqs: Tensor) -> Tensor:
        """Router logits ``[B, C]``. seqs ``[B, L]`` int64, validated by the caller."""
        return torch.ops.canet.router_logits(seqs, self.router_weights, self.router_heads)

    def scores(self, seqs: Tensor, plan: Plan, block_users: int = 0) -> Tensor:
        """Scores ``[B, N+1]`` (users in input order) following ``plan``. seqs ``[B, L]``.
        ``block_users``: users per work item (0 = automatic)."""
        return torch.ops.canet.routed_scores(*self._routed_args(seqs, plan, block_users))

    def last_hidden(self, seqs: Tensor, plan: Plan, block_users: int = 0) -> Tensor:
        """The last position's hidden states ``[B, H]`` (input order), zero past each user's
        hidden size: :meth:`scores` without the output layer. seqs ``[B, L]``."""
        return torch.ops.canet.routed_last_hidden(*self._routed_args(seqs, plan, block_users))

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """The output layer's weight ``[N+1, H]`` and bias ``[N+1]``."""
        return self.weights[-2], self.weights[-1]

    def packed(self) -> list[Tensor]:
        """The packed GEMM weights, re-packed where a weight changed since (empty when not
        packable: float64, or inference tensors)."""
        if not self._packable:
            return []
        versions = [w._version for w, _, _ in self._pack_sources]
        if versions != self._packed_versions:
            old = self._packed
            self._packed = [
                old[i] if i < len(old) and v == self._packed_versions[i]
                else torch.ops.canet.pack_panels(w, row0, rows)
                for i, ((w, row0, rows), v) in enumerate(
                    zip(self._pack_sources, versions, strict=True))
            ]
            self._packed_versions = versions
        return self._packed

    def _routed_args(self, seqs: Tensor, plan: Plan, block_users: int) -> tuple:
        # routed_scores and routed_last_hidden share one signature.
        return (
            seqs, plan.order, plan.group_config, plan.group_offsets, self.table,
            self.weights, self.heads, block_users, self.packed(),
        )
