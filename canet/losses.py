"""CANet's training objective, as the paper's code defines it.

``L = CE(next item at every non-padding position) + w_guide * L_guide + w_uni * L_uni``

* ``L_guide``: per user, whether the SMALLEST sub-network already ranks the last target in its
  top ``k`` (history excluded) decides a soft label for each routing dimension: a hit pushes the
  emb, hidden and depth marginals toward small choices, a miss toward large ones. Labels are the
  paper's ``gen_softlabel``: ``p_j ∝ (2^j / 2^n + 1e-8) ** sharpness`` toward large (reversed
  toward small), sharpness 2 for emb and hidden, 1 for depth.
* ``L_uni``: cross-entropy of the router distribution against the uniform one (keeps every
  config in use while the supernet trains).

Difference from the paper's code, on purpose: there both auxiliary cross-entropies apply
``log_softmax`` to the summed router LOGITS; here they use the router's probabilities and their
true marginals (``-sum label * log marginal``).

Not in the paper, off by default: a FLOPs target (``flops_target`` in the training config,
:func:`flops_loss`) adds ``w_flops * (E_b[sum_c p_bc f_c] - target)^2``, where ``f_c`` is config
``c``'s inference FLOPs over the largest config's (:func:`canet.budget.flops_fractions`, the cost
a serve-time budget counts) and ``p_b`` user ``b``'s router distribution. Squared, not a hinge
``max(0, E - target)^2``: the target is the compute the run should train its router for, so
missing it from below (a router that spends less than asked, e.g. collapsed on a small config)
is pulled back as well as overspending; a hinge would make the target a ceiling only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .budget import flops_fractions
from .space import RoutingSpace

# Rows [B, ...] -> their mean over the batch [...] (see balance_loss).
BatchMean = Callable[[Tensor], Tensor]

__all__ = [
    "soft_labels",
    "decoupled_marginals",
    "balance_loss",
    "flops_fraction_table",
    "flops_loss",
    "guide_loss",
    "uniform_loss",
    "next_item_loss",
    "linear_cross_entropy",
    "smallest_hits",
    "LossWeights",
]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the auxiliary losses and the guide's top-k (the paper's defaults)."""

    guide: float = 0.01
    uniform: float = 0.01
    # Not in the paper (0 = its objective): weight of balance_loss, against router collapse.
    balance: float = 0.0
    guide_k: int = 10
    sharpness_emb: float = 2.0
    sharpness_hidden: float = 2.0
    sharpness_depth: float = 1.0


def soft_labels(n: int, sharpness: float) -> tuple[Tensor, Tensor]:
    """(toward_small ``[n]``, toward_large ``[n]``) soft labels over n ordered choices (float64)."""
    weights = torch.tensor([2.0**j / 2.0**n for j in range(n)], dtype=torch.float64) + 1e-8
    toward_large = torch.softmax(sharpness * weights.log(), dim=0)
    return toward_large.flip(0), toward_large


def _membership(space: RoutingSpace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """0/1 matrices ``[C, n_dim]``: config c uses choice j of emb / hidden / depth."""
    def member(values: tuple[int, ...], pick) -> Tensor:
        ids = torch.tensor([values.index(pick(c)) for c in space.configs], device=device)
        return F.one_hot(ids, len(values))

    return (
        member(space.emb, lambda c: c.emb),
        member(space.hidden, lambda c: c.hidden),
        member(space.depths, lambda c: c.depth),
    )


@functools.lru_cache(maxsize=32)
def _membership_as(
    space: RoutingSpace, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    # Built once per (space, dtype, device): a training step then copies nothing to the device.
    # Plain tensors even when first built under inference_mode (a later backward saves them).
    with torch.inference_mode(False), torch.no_grad():
        return tuple(m.to(dtype) for m in _membership(space, device))


@functools.lru_cache(maxsize=32)
def _labels_as(
    n: int, sharpness: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        return tuple(t.to(dtype=dtype, device=device) for t in soft_labels(n, sharpness))


def decoupled_marginals(probs: Tensor, space: RoutingSpace) -> tuple[Tensor, Tensor, Tensor]:
    """Router distribution ``[B, C]`` -> marginals over emb ``[B, nE]``, hidden ``[B, nH]``,
    depth ``[B, nD]``."""
    return tuple(probs @ m for m in _membership_as(space, probs.dtype, probs.device))


def guide_loss(
    router_logits: Tensor,
    smallest_hit: Tensor,
    space: RoutingSpace,
    weights: LossWeights = LossWeights(),
) -> Tensor:
    """L_guide: router logits ``[B, C]``, smallest_hit ``[B]`` bool -> scalar (mean over B)."""
    probs = torch.softmax(router_logits, dim=-1)
    total = router_logits.new_zeros(())
    sharpness = (weights.sharpness_emb, weights.sharpness_hidden, weights.sharpness_depth)
    for marginal, sharp in zip(decoupled_marginals(probs, space), sharpness, strict=True):
        small, large = _labels_as(marginal.shape[-1], float(sharp), probs.dtype, probs.device)
        labels = torch.where(smallest_hit[:, None], small, large)
        total = total - (labels * marginal.clamp_min(1e-30).log()).sum(-1).mean()
    return total


def uniform_loss(router_logits: Tensor) -> Tensor:
    """L_uni: ``-mean_c log p_c`` averaged over users. router_logits ``[B, C]`` -> scalar."""
    return -torch.log_softmax(router_logits, dim=-1).mean(-1).mean()


def balance_loss(router_logits: Tensor, batch_mean: BatchMean | None = None) -> Tensor:
    """KL(batch-mean router distribution || uniform): 0 when the batch as a whole uses every
    config equally, log C when all users pick one config. Unlike L_uni it leaves each user's
    own distribution free to be sharp. router_logits ``[B, C]`` -> scalar. ``batch_mean``: how
    to average over the batch (default ``rows.mean(0)``; a distributed step passes the mean
    over the global batch, :func:`canet.distributed.batch_mean`)."""
    probs = torch.softmax(router_logits, dim=-1)
    mean = probs.mean(0) if batch_mean is None else batch_mean(probs)
    return (mean * (mean.clamp_min(1e-30) * mean.shape[0]).log()).sum()


@functools.lru_cache(maxsize=32)
def flops_fraction_table(
    space: RoutingSpace, max_len: int, num_items: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``[C]`` FLOPs fraction of each config (:func:`canet.budget.flops_fractions`, the cost a
    serve-time budget counts), built once per (space, max_len, num_items, dtype, device)."""
    # Cached as the other tables here: a training step copies nothing to the device. A plain
    # tensor even when first built under inference_mode (a later backward saves it).
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(flops_fractions(space, max_len, num_items), dtype=dtype, device=device)


def flops_loss(
    router_logits: Tensor, fractions: Tensor, target: float, batch_mean: BatchMean | None = None
) -> tuple[Tensor, Tensor]:
    """FLOPs-target penalty: router logits ``[B, C]``, fractions ``[C]`` (config FLOPs over the
    largest's, :func:`flops_fraction_table`), target in (0, 1] -> (penalty, expected), both
    float32 scalars: ``expected = mean_b sum_c softmax(logits_b)_c * fractions_c`` (the router's
    expected FLOPs fraction over the batch) and ``penalty = (expected - target)^2`` (squared:
    pulls from both sides; see the module docstring). Its gradient is zero at the target.
    ``batch_mean``: as in :func:`balance_loss`."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    per_user = probs @ fractions.float()
    expected = per_user.mean() if batch_mean is None else batch_mean(per_user)
    return (expected - target).square(), expected


def next_item_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy at every position with a target. logits ``[..., N+1]`` (e.g. ``[B, L, N+1]``,
    or ``[T, N+1]`` at targeted positions only), targets ``[...]`` (0 = no target) -> scalar mean
    over targeted positions, in float32 at least (softmax statistics never in bf16/fp16)."""
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=0)


# Logits per linear_cross_entropy chunk. CPU: about 4M (16 MB in float32), small enough that a
# chunk's buffers are reused by the allocator from step to step (glibc serves blocks under
# 32 MB from its heap; larger ones are fresh mmaps, paid again in page faults every step).
# CUDA: few, large chunks (each chunk is a dozen kernel launches).
_CE_CHUNK_ELEMENTS = 1 << 22
_CE_CHUNK_ELEMENTS_CUDA = 1 << 26


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight^T + bias`` in row chunks, gradients computed in the
    forward (as Liger-Kernel's fused linear cross-entropy): the ``[T, N]`` logits and their
    gradient never exist at once, and there is no log-softmax backward pass.

    The GEMMs run in the autocast dtype when autocast is on (bf16 on CUDA), else in the
    weight's dtype; the softmax statistics and the loss in float32 at least; the gradients
    come back in each input's own dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
        rows, device = x.shape[0], x.device
        budget = _CE_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else _CE_CHUNK_ELEMENTS
        chunk = max(1, budget // max(1, weight.shape[0]))
        amp = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if amp else weight.dtype
        stats = torch.promote_types(compute, torch.float32)
        w, b = weight.to(compute), bias.to(compute)
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=stats, device=device)
        grad_bias = torch.zeros(bias.shape, dtype=stats, device=device)
        total = torch.zeros((), dtype=stats, device=device)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, rows, chunk):
                xc = x[start : start + chunk].to(compute)
                tc = targets[start : start + chunk]
                logits = F.linear(xc, w, b).to(stats)  # [c, N]
                lse = torch.logsumexp(logits, dim=1)
                total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
                # d(mean CE)/d logits = (softmax - onehot) / rows, built in place in the logits.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(tc.shape[0], device=device), tc] -= 1.0
                grad = probs.div_(rows).to(compute)
                grad_x[start : start + chunk] = grad @ w
                if compute == stats:
                    grad_weight.addmm_(grad.t(), xc)
                else:  # bf16/fp16 GEMM, fp32 accumulation across chunks
                    grad_weight += (grad.t() @ xc).to(stats)
                grad_bias += grad.sum(0, dtype=stats)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype))
        return total / rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_weight, grad_bias = ctx.saved_tensors
        return grad_x * grad_out, grad_weight * grad_out, grad_bias * grad_out, None


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
    """Mean next-item cross-entropy over ``T`` targeted positions, fused with the output layer.

    x ``[T, h]`` hidden states, weight ``[N+1, H]`` and bias ``[N+1]`` the output layer (row 0
    = padding: never a candidate, as the ``-inf`` column of ``Supernet.logits``), targets
    ``[T]`` item ids in 1..N -> scalar. Equals ``next_item_loss(supernet.logits(x), targets)``
    up to float rounding, without materialising the ``[T, N+1]`` logits (softmax statistics in
    float32 at least). An empty ``x`` gives NaN, as the mean over no targets."""
    h = x.shape[-1]
    return _LinearCrossEntropy.apply(x, weight[1:, :h], bias[1:], targets - 1)


def smallest_hits(
    model, seqs: Tensor, last_targets: Tensor, k: int = 10, exclude_history: bool = True
) -> Tensor:
    """Whether the smallest sub-network ranks ``last_targets [B]`` in its top k, history excluded
    (as the paper's code). seqs ``[B, L]`` -> bool ``[B]``. No gradients.

    The scores are computed in the model's current mode, so during training the guide's label
    sees dropout, as in the paper's code (its ``CE.compute`` runs ``model(seqs, 'smallest')``
    under ``no_grad`` while the model is in train mode). Kept on purpose: the label then asks
    whether the smallest sub-network's hit survives the same noise the CE term trains under,
    and switching to eval mode here would change every seed's training trajectory (the dropout
    draws move the global RNG). Call it on an ``eval()`` model for a deterministic label."""
    with torch.no_grad():
        smallest = model.space.configs[model.space.smallest_id]
        scores = model.supernet.logits(model.supernet.last_hidden(seqs, smallest))
        if exclude_history:
            scores = scores.scatter(1, seqs, float("-inf"))
        # Rank by count so an excluded (-inf) target is never a hit, even with k >= N.
        target = scores.gather(1, last_targets[:, None])
        ahead = (scores > target).sum(-1)
        return torch.isfinite(target[:, 0]) & (ahead < k)
