"""CANet in pure PyTorch: the weight-sliced supernet, its masked training path and the router.

This module is the normative reference: every engine backend must reproduce ``CANet.score``.

Semantics (one sub-network, config ``(d, h, e)``; every slice is a PREFIX of a max-size tensor):

* ``x = (item_emb[seq] + pos_emb)[..., :e] @ in_proj.weight[:h, :e]^T + in_proj.bias[:h]``
* each block ``i < d``: ``q, k, v`` from the q/k/v row blocks of ``qkv`` sliced ``[:h, :h]``;
  heads are INTERLEAVED (channel ``c`` belongs to head ``c % heads`` at position
  ``c // heads``) so a hidden prefix keeps every head and only shortens them; causal attention
  that never looks at padding keys, scale ``1/sqrt(h/heads)``; ``a = out(o)`` sliced;
  ``x = LN_h(x + res_scale1 * dropout(a))``;
  ``f = fc2(GELU_erf(fc1(x)))`` with ``fc1[:4h, :h]``, ``fc2[:h, :4h]``;
  ``x = LN_h(x + res_scale2 * dropout(f))``; LayerNorm eps 1e-5 with weight/bias ``[:h]``.
* ``score = x[:, -1] @ out.weight[:, :h]^T + out.bias``, column 0 (padding) is ``-inf``.

A query at a padding position attends to itself only (it has no real key at or before it in a
left-padded row); this keeps every value finite, and real positions never see padding.

The masked path runs every sample at max width with per-sample prefix masks (the paper's way to
train all sub-networks in one dense pass and give the router gradients). With one-hot choices it
equals the sliced path. The paper's released code does NOT have this property: it trains with one
head layout, a 512-wide FFN and scale ``1/sqrt(32)`` for every config, and serves differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import BudgetTable, RoutingPenalty, flops_fractions, route_with_penalty
from .checks import check_choice, check_config_ids, check_sequences
from .space import Config, RoutingSpace

__all__ = [
    "BLOCK_PARAMS", "CANet", "Supernet", "Router", "Block", "LN_EPS", "RESIDUAL_SCALE_INIT",
]

LN_EPS = 1e-5
RESIDUAL_SCALE_INIT = 1e-8  # as the paper's code: blocks start as (almost) identities


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, then k, then v
        self.out = nn.Linear(width, width)


class FeedForward(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


# The parameters of one Block (names relative to the block), in the order the native ops read
# them from their weight list: the 12 tensors, then the 2 residual scales (0-d; a block without
# residual scaling passes ones). csrc/cpu/routed_forward.cpp (block_at) spells the same list;
# tests/test_build.py checks that the two agree.
BLOCK_PARAMS: tuple[str, ...] = (
    "attn.qkv.weight", "attn.qkv.bias", "attn.out.weight", "attn.out.bias",
    "ln1.weight", "ln1.bias", "ffn.fc1.weight", "ffn.fc1.bias",
    "ffn.fc2.weight", "ffn.fc2.bias", "ln2.weight", "ln2.bias",
    "res_scale1", "res_scale2",
)


class Block(nn.Module):
    """Post-LN transformer block at max width; sub-networks use prefixes of its weights.

    Its parameters are :data:`BLOCK_PARAMS` (without the residual scales when
    ``residual_scaling`` is off)."""

    def __init__(self, width: int, residual_scaling: bool = True) -> None:
        super().__init__()
        self.attn = Attention(width)
        self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ffn = FeedForward(width)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
        if residual_scaling:
            self.res_scale1 = nn.Parameter(torch.tensor(RESIDUAL_SCALE_INIT))
            self.res_scale2 = nn.Parameter(torch.tensor(RESIDUAL_SCALE_INIT))
        else:
            self.register_parameter("res_scale1", None)
            self.register_parameter("res_scale2", None)

    @property
    def width(self) -> int:
        return self.ln1.weight.shape[0]


def allowed_keys(seqs: Tensor) -> Tensor:
    """Attention mask ``[B, 1, L, L]`` (True = may attend): causal, real keys, plus the diagonal.

    The diagonal keeps rows of padding queries non-empty (no NaN); a real query's diagonal is a
    real key anyway, so real positions never see padding.
    """
    # From position comparisons rather than tril/eye: torch.eye(dtype=bool) exports to an ONNX
    # EyeLike that ONNX Runtime's CPU provider has no bool kernel for.
    position = torch.arange(seqs.shape[1], device=seqs.device)
    query, key = position[:, None], position[None, :]
    real_key = (seqs != 0)[:, None, None, :]
    return (key <= query) & (real_key | (key == query))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, L, w]`` -> ``[B, heads, L, w / heads]``, heads interleaved (c -> head c % heads)."""
    batch, length, width = x.shape
    return x.view(batch, length, width // heads, heads).permute(0, 3, 1, 2)


def merge_heads(o: Tensor) -> Tensor:
    """Inverse of :func:`split_heads`: ``[B, heads, L, d]`` -> ``[B, L, d * heads]``."""
    batch, heads, length, head_dim = o.shape
    return o.permute(0, 2, 3, 1).reshape(batch, length, head_dim * heads)


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float | Tensor) -> Tensor:
    """Exact softmax attention. q, k, v ``[B, heads, L, d]``; allowed ``[B, 1, L, L]``;
    scale a float or ``[B, 1, 1, 1]``. Returns ``[B, heads, L, d]``."""
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def _residual(scale: Tensor | None, update: Tensor) -> Tensor:
    return update if scale is None else scale * update


def block_sliced(
    block: Block,
    x: Tensor,
    hidden: int,
    heads: int,
    allowed: Tensor,
    dropout: float = 0.0,
    training: bool = False,
    last_only: bool = False,
) -> Tensor:
    """One block of the sub-network of width ``hidden``. x ``[B, L, hidden]`` -> ``[B, L, hidden]``.

    With ``last_only`` (a user's final block at inference) only the last query row is computed:
    keys and values still cover every position; returns ``[B, 1, hidden]``.
    """
    width = block.width
    h = hidden
    w_qkv, b_qkv = block.attn.qkv.weight, block.attn.qkv.bias
    if last_only:
        x_query, allowed = x[:, -1:], allowed[:, :, -1:]
    else:
        x_query = x
    q = F.linear(x_query, w_qkv[:h, :h], b_qkv[:h])
    k, v = (F.linear(x, w_qkv[r : r + h, :h], b_qkv[r : r + h]) for r in (width, 2 * width))
    o = attend(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), allowed,
        1.0 / math.sqrt(h // heads),
    )
    x = x_query
    a = F.linear(merge_heads(o), block.attn.out.weight[:h, :h], block.attn.out.bias[:h])
    a = F.dropout(a, dropout, training)
    x = F.layer_norm(
        x + _residual(block.res_scale1, a), (h,), block.ln1.weight[:h], block.ln1.bias[:h], LN_EPS
    )
    ffn = block.ffn
    u = F.gelu(F.linear(x, ffn.fc1.weight[: 4 * h, :h], ffn.fc1.bias[: 4 * h]))
    f = F.dropout(F.linear(u, ffn.fc2.weight[:h, : 4 * h], ffn.fc2.bias[:h]), dropout, training)
    return F.layer_norm(
        x + _residual(block.res_scale2, f), (h,), block.ln2.weight[:h], block.ln2.bias[:h], LN_EPS
    )


def masked_layer_norm(z: Tensor, mask: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over each sample's channel prefix. z ``[B, L, H]``, mask ``[B, H]`` (1 on the
    prefix). Channels outside the prefix come out as zero. Statistics are computed in float32
    at least (as F.layer_norm does under autocast)."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z, mask = z.float(), mask.float()
    m = mask[:, None, :]
    count = m.sum(-1, keepdim=True)
    mean = (z * m).sum(-1, keepdim=True) / count
    centred = (z - mean) * m
    var = (centred * centred).sum(-1, keepdim=True) / count
    return (centred * torch.rsqrt(var + LN_EPS) * weight + bias) * m


def block_masked(
    block: Block,
    x: Tensor,
    hidden_mask: Tensor,
    ffn_mask: Tensor,
    scale: Tensor,
    heads: int,
    allowed: Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """One block at max width with per-sample prefix masks.

    x ``[B, L, H]`` (zero outside each sample's prefix), hidden_mask ``[B, H]``, ffn_mask
    ``[B, 4H]``, scale ``[B]`` (1/sqrt(head dim) per sample). Returns ``[B, L, H]``.
    """
    width = block.width
    hm = hidden_mask[:, None, :]
    w_qkv, b_qkv = block.attn.qkv.weight, block.attn.qkv.bias
    q, k, v = (
        F.linear(x, w_qkv[r : r + width], b_qkv[r : r + width]) * hm
        for r in (0, width, 2 * width)
    )
    # Interleaved heads: a hidden prefix of h channels is a head-dim prefix of h/heads in every
    # head, so the zeroed channels drop out of q.k exactly.
    o = attend(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), allowed,
        scale[:, None, None, None],
    )
    a = F.linear(merge_heads(o), block.attn.out.weight, block.attn.out.bias) * hm
    a = F.dropout(a, dropout, training)
    x = masked_layer_norm(
        x + _residual(block.res_scale1, a), hidden_mask, block.ln1.weight, block.ln1.bias
    )
    u = F.linear(x, block.ffn.fc1.weight, block.ffn.fc1.bias) * ffn_mask[:, None, :]
    f = F.linear(F.gelu(u), block.ffn.fc2.weight, block.ffn.fc2.bias) * hm
    f = F.dropout(f, dropout, training)
    return masked_layer_norm(
        x + _residual(block.res_scale2, f), hidden_mask, block.ln2.weight, block.ln2.bias
    )


class Supernet(nn.Module):
    """All sub-networks of a routing space in one set of max-size weights.

    Parameters follow the canonical checkpoint schema (``supernet.`` prefix inside CANet):
    ``item_emb.weight [N+1, E]``, ``pos_emb.weight [L, E]``, ``in_proj [H, E]``,
    ``blocks.{i}.*`` for i < max depth, ``out.weight [N+1, H]``, ``out.bias [N+1]``.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        space: RoutingSpace,
        dropout: float = 0.2,
        residual_scaling: bool = True,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.space = space
        self.dropout = dropout
        width, emb = space.max_hidden, space.max_emb
        self.item_emb = nn.Embedding(num_items + 1, emb, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, emb)
        self.in_proj = nn.Linear(emb, width)
        self.blocks = nn.ModuleList(
            Block(width, residual_scaling) for _ in range(space.max_depth)
        )
        self.out = nn.Linear(width, num_items + 1)

    def _embed(self, seqs: Tensor, emb: int) -> Tensor:
        # A batch may come trimmed to its last L' <= max_len columns (training drops columns
        # that are padding in every row): positions stay those of the full window.
        positions = self.pos_emb.weight[self.max_len - seqs.shape[1] :, :emb]
        x = F.embedding(seqs, self.item_emb.weight[:, :emb]) + positions
        return F.dropout(x, self.dropout, self.training)

    def hidden_sliced(self, seqs: Tensor, config: Config) -> Tensor:
        """Hidden states of one sub-network. seqs ``[B, L]`` int64 -> ``[B, L, config.hidden]``."""
        h, e = config.hidden, config.emb
        x = F.linear(self._embed(seqs, e), self.in_proj.weight[:h, :e], self.in_proj.bias[:h])
        allowed = allowed_keys(seqs)
        for block in self.blocks[: config.depth]:
            x = block_sliced(block, x, h, self.space.heads, allowed, self.dropout, self.training)
        return x

    def last_hidden(self, seqs: Tensor, config: Config) -> Tensor:
        """Last-position hidden state of one sub-network, computing only what it needs: the final
        block runs its queries, FFN and norms on the last row alone. ``[B, L]`` -> ``[B, h]``."""
        h, e = config.hidden, config.emb
        x = F.linear(self._embed(seqs, e), self.in_proj.weight[:h, :e], self.in_proj.bias[:h])
        allowed = allowed_keys(seqs)
        depth = config.depth
        for i, block in enumerate(self.blocks[:depth]):
            x = block_sliced(
                block, x, h, self.space.heads, allowed, self.dropout, self.training,
                last_only=i == depth - 1,
            )
        return x[:, -1]

    def hidden_masked(self, seqs: Tensor, choice: Tensor) -> Tensor:
        """Hidden states of the masked path. seqs ``[B, L]``, choice ``[B, C]`` (straight-through
        one-hot) -> ``[B, L, H]``, zero outside each sample's hidden prefix.

        Every mask is ``choice @ table`` so the router receives gradients through the emb,
        hidden, head-scale and depth choices.
        """
        tables = self._choice_tables(choice.dtype, choice.device)
        # The masks, head scales and depth gates in the choice's dtype even under autocast (a
        # bf16 1/sqrt(head dim) would differ from the one the engine serves with).
        with torch.autocast(choice.device.type, enabled=False):
            emb_mask = choice @ tables["emb_mask"]
            hidden_mask = choice @ tables["hidden_mask"]
            ffn_mask = choice @ tables["ffn_mask"]
            scale = choice @ tables["scale"]
            runs = (choice @ tables["runs"].T).T[:, :, None, None]  # [D, B, 1, 1]
            stops = (choice @ (1.0 - tables["runs"]).T).T[:, :, None, None]
        x = self._embed(seqs, self.space.max_emb) * emb_mask[:, None, :]
        x = F.linear(x, self.in_proj.weight, self.in_proj.bias) * hidden_mask[:, None, :]
        allowed = allowed_keys(seqs)
        for i, block in enumerate(self.blocks):
            # As the paper's code: a sample whose depth is <= i carries x through unchanged.
            y = block_masked(
                block, x, hidden_mask, ffn_mask, scale, self.space.heads, allowed,
                self.dropout, self.training,
            )
            x = runs[i] * y + stops[i] * x
        return x

    def _choice_tables(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Per-config rows that turn a routing choice into masks: ``emb_mask [C, E]``,
        ``hidden_mask [C, H]``, ``ffn_mask [C, 4H]``, ``scale [C]``, ``runs [D, C]``. Built
        once per (dtype, device): a training step then copies nothing to the device."""
        key = (dtype, device)
        cache = self.__dict__.setdefault("_choice_table_cache", {})
        if key not in cache:
            # Plain tensors even when first asked for under inference_mode (an inference
            # tensor could not be saved for a later training step's backward).
            with torch.inference_mode(False), torch.no_grad():
                cache[key] = self._build_choice_tables(dtype, device)
        return cache[key]

    def _build_choice_tables(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        space = self.space
        configs = space.configs

        def prefix(size_of, width: int) -> Tensor:
            sizes = torch.tensor([size_of(c) for c in configs], device=device)
            return (torch.arange(width, device=device) < sizes[:, None]).to(dtype)

        depths = torch.tensor([c.depth for c in configs], device=device)
        return {
            "emb_mask": prefix(lambda c: c.emb, space.max_emb),
            "hidden_mask": prefix(lambda c: c.hidden, space.max_hidden),
            "ffn_mask": prefix(lambda c: 4 * c.hidden, 4 * space.max_hidden),
            "scale": torch.tensor(
                [1.0 / math.sqrt(c.hidden // space.heads) for c in configs],
                dtype=dtype, device=device,
            ),
            "runs": (depths[None, :] > torch.arange(space.max_depth, device=device)[:, None]).to(
                dtype
            ),
        }

    def logits(self, x: Tensor) -> Tensor:
        """Item scores: hidden states ``[..., h]`` (h <= H) -> ``[..., N+1]``; column 0 = -inf."""
        h = x.shape[-1]
        scores = F.linear(x, self.out.weight[:, :h], self.out.bias)
        # In place, no copy of the (large) score matrix: linear's backward needs its input and
        # the incoming gradient, never its output, so autograd allows the write.
        scores[..., 0] = float("-inf")
        return scores


class Router(nn.Module):
    """Picks a config per user: own embeddings (dim 32), one transformer block (4 heads, FFN 128),
    the last position -> logits over configs."""

    def __init__(
        self,
        num_items: int,
        max_len: int,
        n_configs: int,
        dim: int = 32,
        heads: int = 4,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"router dim {dim} must be divisible by router heads {heads}")
        self.num_items = num_items
        self.max_len = max_len
        self.heads = heads
        self.dropout = dropout
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.block = Block(dim, residual_scaling=False)
        self.head = nn.Linear(dim, n_configs)

    @property
    def dim(self) -> int:
        return self.block.width

    def forward(self, seqs: Tensor) -> Tensor:
        """Router logits. seqs ``[B, L]`` left-padded item ids -> ``[B, n_configs]``."""
        seqs = check_sequences(seqs, self.num_items, self.max_len)
        return self.logits_unchecked(seqs)

    def logits_unchecked(self, seqs: Tensor) -> Tensor:
        """:meth:`forward` without boundary checks, for callers that validated already. seqs
        may be trimmed to its last L' <= max_len columns (positions stay the full window's)."""
        x = self.item_emb(seqs) + self.pos_emb.weight[self.max_len - seqs.shape[1] :]
        x = F.dropout(x, self.dropout, self.training)
        x = block_sliced(
            self.block, x, self.dim, self.heads, allowed_keys(seqs), self.dropout, self.training
        )
        return self.head(x[:, -1])


def gumbel_straight_through(
    logits: Tensor,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    exponential: Tensor | None = None,
) -> Tensor:
    """Gumbel-softmax with a straight-through one-hot. logits ``[B, C]`` -> ``[B, C]``: one-hot
    values forward, the soft sample's gradient backward. The noise is ``-log E`` of standard
    exponential draws ``E [B, C]``: drawn here from ``generator``, or given as ``exponential``
    (a distributed step passes its rows of the global batch's draws, so that a sample's noise
    does not depend on the rank that computes it)."""
    if tau <= 0:
        raise ValueError(f"Gumbel temperature must be > 0, got {tau}")
    if exponential is None:
        exponential = torch.empty_like(logits).exponential_(generator=generator)
    noise = exponential.log().neg()
    soft = torch.softmax((torch.log_softmax(logits, dim=-1) + noise) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class CANet(nn.Module):
    """Per-user adaptive architecture: a router picks one sub-network of a weight-sliced supernet.

    ``score`` (sliced: each user runs only its own sub-network) is the reference every engine
    backend must equal; ``score_masked``/``logits_masked`` are the dense training path.
    Dropout follows the usual ``train()``/``eval()`` mode; call ``eval()`` for inference.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        space: RoutingSpace | None = None,
        dropout: float = 0.2,
        router_dim: int = 32,
        router_heads: int = 4,
        residual_scaling: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive int, got {num_items!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.space = space if space is not None else RoutingSpace()
        self.num_items = num_items
        self.max_len = max_len
        self.arch = {
            "num_items": num_items,
            "max_len": max_len,
            "space": self.space.to_dict(),
            "dropout": dropout,
            "router_dim": router_dim,
            "router_heads": router_heads,
            "residual_scaling": residual_scaling,
        }
        # Calibrated serve-time budgets (canet.budget), set by training or load_checkpoint.
        self.budget_table: BudgetTable | None = None
        self.supernet = Supernet(num_items, max_len, self.space, dropout, residual_scaling)
        self.router = Router(
            num_items, max_len, self.space.n_configs, router_dim, router_heads, dropout
        )
        self.reset_parameters()

    @classmethod
    def from_arch(cls, arch: dict) -> CANet:
        """Rebuild from :attr:`arch` (as stored in checkpoints)."""
        arch = dict(arch)
        space = RoutingSpace.from_dict(arch.pop("space"))
        return cls(space=space, **arch)

    def reset_parameters(self) -> None:
        """SASRec-style init: normal(0, 0.02) weights, zero biases, unit LayerNorm, zero padding
        embedding; residual scales at the paper's 1e-8."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
                elif module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Block) and module.res_scale1 is not None:
                nn.init.constant_(module.res_scale1, RESIDUAL_SCALE_INIT)
                nn.init.constant_(module.res_scale2, RESIDUAL_SCALE_INIT)

    # -- inference -------------------------------------------------------------------------
    def check(self, seqs: Tensor) -> Tensor:
        """Validate a batch ``[B, L]`` against this model (ValueError) and return it as int64."""
        return check_sequences(seqs, self.num_items, self.max_len)

    @property
    def flops_fractions(self) -> tuple[float, ...]:
        """Inference FLOPs of each config over the largest's (canet.budget.flops_fractions)."""
        return flops_fractions(self.space, self.max_len, self.num_items)

    def route(self, seqs: Tensor, penalty: RoutingPenalty | None = None) -> Tensor:
        """Deterministic routing: argmax of the router logits, minus ``penalty``'s
        ``lam * FLOPs fraction`` (a serve-time budget, :mod:`canet.budget`) when given.
        seqs ``[B, L]`` -> ids ``[B]``. The reference every backend's routing must equal."""
        return self._route_checked(self.check(seqs), penalty)

    def _route_checked(self, seqs: Tensor, penalty: RoutingPenalty | None) -> Tensor:
        with torch.no_grad():
            logits = self.router.logits_unchecked(seqs)
        vector = None if penalty is None else penalty.vector(self.flops_fractions, seqs.device)
        return route_with_penalty(logits, vector)

    def score(
        self,
        seqs: Tensor,
        config_ids: Tensor | None = None,
        penalty: RoutingPenalty | None = None,
    ) -> Tensor:
        """Last-position scores through each user's own sub-network (the sliced path).

        seqs ``[B, L]`` left-padded item ids; config_ids ``[B]`` (None: the router decides,
        biased by ``penalty`` when given). Returns ``[B, N+1]`` in the model's dtype; column 0
        (padding) is -inf.
        """
        seqs = self.check(seqs)
        if config_ids is None:
            config_ids = self._route_checked(seqs, penalty)
        config_ids = check_config_ids(config_ids, seqs.shape[0], self.space.n_configs)
        config_ids = config_ids.to(seqs.device)
        dtype = self.supernet.out.weight.dtype
        scores = torch.empty(seqs.shape[0], self.num_items + 1, dtype=dtype, device=seqs.device)
        for config_id in torch.unique(config_ids).tolist():
            rows = (config_ids == config_id).nonzero().flatten()
            x = self.supernet.hidden_sliced(seqs[rows], self.space.configs[config_id])
            scores[rows] = self.supernet.logits(x[:, -1])
        return scores

    def score_masked(self, seqs: Tensor, choice: Tensor) -> Tensor:
        """Last-position scores through the masked training path (every user at full width).

        seqs ``[B, L]``; choice ``[B, C]`` one-hot (or straight-through one-hot). ``[B, N+1]``.
        """
        seqs = self.check(seqs)
        choice = check_choice(choice, seqs.shape[0], self.space.n_configs)
        x = self.supernet.hidden_masked(seqs, choice.to(self.supernet.out.weight.dtype))
        return self.supernet.logits(x[:, -1])

    # -- training --------------------------------------------------------------------------
    def logits_masked(self, seqs: Tensor, choice: Tensor) -> Tensor:
        """Next-item logits at every position via the masked path: ``[B, L]`` -> ``[B, L, N+1]``.

        Does not validate (training batches come from the data pipeline)."""
        return self.supernet.logits(self.supernet.hidden_masked(seqs, choice))

    def logits_sliced(self, seqs: Tensor, config: Config) -> Tensor:
        """Next-item logits at every position for one fixed sub-network: ``[B, L, N+1]``."""
        return self.supernet.logits(self.supernet.hidden_sliced(seqs, config))

    def one_hot(self, config_ids: Tensor) -> Tensor:
        """config ids ``[B]`` -> one-hot choice ``[B, C]`` in the model's dtype."""
        return F.one_hot(config_ids, self.space.n_configs).to(self.supernet.out.weight.dtype)
