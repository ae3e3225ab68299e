"""The pure-PyTorch engine backend: the plan executed group by group with PyTorch ops.

It is the correctness oracle of the other backends and the fallback when they are missing.
Each group runs only its own sub-network on weight slices read in place, and its final block
computes the last query row only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import CANet
from ..ops import Plan
from . import base

__all__ = ["Backend", "module_over"]


def module_over(arch: dict, state: dict[str, Tensor]) -> CANet:
    """A CANet whose parameters ARE the given tensors (no copy), in eval mode."""
    with torch.device("meta"):
        model = CANet.from_arch(arch)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


class Backend(base.Backend):
    """The plan run group by group through the PyTorch model's sliced path (the oracle)."""

    NAME = "torch"
    DEVICE_TYPES = None  # any device PyTorch runs on
    DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def __init__(self, arch: dict, state: dict[str, Tensor], device: torch.device) -> None:
        super().__init__(arch, state, device)
        self.model = module_over(arch, state)
        self.configs = self.model.space.configs

    def router_logits(self, seqs: Tensor) -> Tensor:
        """Router logits ``[B, C]`` (PyTorch). seqs ``[B, L]`` int64, validated by the caller."""
        return self.model.router.logits_unchecked(seqs)

    def scores(self, seqs: Tensor, plan: Plan) -> Tensor:
        """Scores ``[B, N+1]`` (users in input order) following ``plan``. seqs ``[B, L]``."""
        supernet = self.model.supernet
        out = torch.empty(
            seqs.shape[0], supernet.num_items + 1, dtype=supernet.out.weight.dtype,
            device=seqs.device,
        )
        offsets = plan.group_offsets.tolist()
        for group, config_id in enumerate(plan.group_config.tolist()):
            start, end = offsets[group], offsets[group + 1]
            if start == end:
                continue
            users = plan.order[start:end]
            hidden = supernet.last_hidden(seqs[users], self.configs[config_id])
            out[users] = supernet.logits(hidden)
        return out
