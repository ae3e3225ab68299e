"""What every benchmark measures: the model, the inputs, the routing mixes and the dtypes.

This module is the ONE place they are built: ``canet bench``, the pytest-benchmark suite and
the GPU scripts in ``benches/`` import them from here, so every benchmark reports the same
thing. The fixed CPU shape is N = 3000 items, L = 50, the paper's routing space, random
weights with non-trivial residual scales.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .. import backends as backend_registry
from ..engine import Engine
from ..flops import config_flops
from ..model import CANet
from ..space import RoutingSpace

__all__ = [
    "BASELINES",
    "BATCHES",
    "DEFAULT_BACKENDS",
    "DEFAULT_SEED",
    "DTYPES",
    "MIXES",
    "NUM_ITEMS",
    "PAPER_FLOPS_FRACTION",
    "PAPER_SMALL_RATIO",
    "SEQ_LEN",
    "available_backends",
    "build_model",
    "config_histogram",
    "config_fractions",
    "make_config_ids",
    "make_sequences",
    "method_calls",
    "paper_weights",
    "route_like",
]

# -- the fixed benchmark shape -------------------------------------------------------------
NUM_ITEMS = 3000
SEQ_LEN = 50
BATCHES: tuple[int, ...] = (1, 8, 64, 512)
MIXES: tuple[str, ...] = ("paper", "uniform", "smallest", "largest")
DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "cpu")
DEFAULT_SEED = 0
# The paper reports a 55-65% FLOPs reduction from routing, i.e. routed users cost 35-45% of
# the largest sub-network; the `paper` mix is tuned to the middle of that range.
PAPER_FLOPS_FRACTION = 0.40
PAPER_SMALL_RATIO = 0.8  # geometric decay over the FLOPs rank of the "easy users" component

# Methods that do not involve an engine backend, in table order.
BASELINES: tuple[str, ...] = ("supernet_dense", "masked", "supernet_routed")

# The dtypes a benchmark can run in, by the name its command line takes. The order is the
# kernel report's default order (its rows follow it).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


# -- model and inputs ------------------------------------------------------------------------
def build_model(
    num_items: int = NUM_ITEMS,
    seq_len: int = SEQ_LEN,
    space: RoutingSpace | None = None,
    seed: int = DEFAULT_SEED,
) -> CANet:
    """A float32 CANet on the CPU, in eval mode, with seeded random weights.

    Residual scales are drawn in [0.5, 1.0] instead of the paper's 1e-8 init: with 1e-8 every
    block is (almost) an identity, so a benchmark's correctness check could not see an error
    in attention or the FFN, and tiny products can hit denormal floats, which would make
    timings unrepresentative of a trained model.
    """
    model = CANet(num_items, seq_len, space=space if space is not None else RoutingSpace())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "res_scale" in name:
                param.uniform_(0.5, 1.0, generator=generator)
            elif name.endswith(("ln1.weight", "ln2.weight")):
                param.uniform_(0.8, 1.2, generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, 0.05, generator=generator)
        for embedding in (model.supernet.item_emb, model.router.item_emb):
            embedding.weight[0].zero_()  # padding row, as the model's own init
    return model.float().eval().requires_grad_(False)


def _seed_for(*parts: object) -> int:
    """A process-independent seed from labels (Python's ``hash`` of a str is salted)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def make_sequences(
    batch: int, num_items: int = NUM_ITEMS, seq_len: int = SEQ_LEN, seed: int = DEFAULT_SEED
) -> Tensor:
    """``[batch, seq_len]`` int64 full-length item histories (no padding), seeded.

    Full length on purpose: :mod:`canet.flops` counts every one of the L positions, so the
    ideal speedup is exact for these inputs. The same batch size gives the same users for every
    mix, so mix-independent baselines can be measured once per batch size.
    """
    generator = torch.Generator().manual_seed(_seed_for("seqs", batch, seed))
    return torch.randint(1, num_items + 1, (batch, seq_len), generator=generator)


def config_fractions(space: RoutingSpace, seq_len: int, num_items: int) -> Tensor:
    """``[C]`` float64: FLOPs of each config over FLOPs of the largest config."""
    costs = torch.tensor(config_flops(space, seq_len, num_items), dtype=torch.float64)
    return costs / costs[space.largest_id]


def paper_weights(
    space: RoutingSpace,
    seq_len: int = SEQ_LEN,
    num_items: int = NUM_ITEMS,
    target: float = PAPER_FLOPS_FRACTION,
) -> Tensor:
    """Probabilities ``[C]`` of the ``paper`` mix: most users on small configs, a minority on
    the largest, with expected FLOPs fraction (mean FLOPs / largest FLOPs) equal to ``target``.

    A router that saves 55-65% at equal accuracy sends the many easy users to cheap
    sub-networks and the few hard ones to big ones. The mix is ``(1 - lam) * small + lam *
    largest``: ``small`` is geometric over the configs ranked by FLOPs (weight
    ``PAPER_SMALL_RATIO ** rank``, cheapest first), and ``lam`` is solved in closed form so the
    expected fraction is ``target``. (No distribution whose weights merely decrease with FLOPs
    can do this: the uniform mix already costs ~0.39 of the largest on the paper's space.)
    """
    fractions = config_fractions(space, seq_len, num_items)
    order = sorted(range(len(fractions)), key=lambda c: (fractions[c].item(), c))
    rank = torch.empty(len(fractions), dtype=torch.float64)
    rank[order] = torch.arange(len(fractions), dtype=torch.float64)
    small = torch.softmax(math.log(PAPER_SMALL_RATIO) * rank, dim=0)
    small_fraction = float(small @ fractions)
    if not small_fraction < target < 1.0:
        raise ValueError(
            f"paper mix: target FLOPs fraction must lie in ({small_fraction:.3f}, 1), "
            f"got {target}"
        )
    lam = (target - small_fraction) / (1.0 - small_fraction)
    largest = torch.zeros_like(small)
    largest[space.largest_id] = 1.0
    return (1.0 - lam) * small + lam * largest


def make_config_ids(
    mix: str,
    batch: int,
    space: RoutingSpace,
    seq_len: int = SEQ_LEN,
    num_items: int = NUM_ITEMS,
    seed: int = DEFAULT_SEED,
) -> Tensor:
    """Config id per user ``[batch]`` int64 for a routing mix; deterministic in its arguments.

    * ``paper``: drawn from :func:`paper_weights` (expected FLOPs fraction 0.40);
    * ``uniform``: every config equally likely;
    * ``smallest`` / ``largest``: every user at the smallest / largest config.
    """
    if mix == "smallest":
        return torch.full((batch,), space.smallest_id, dtype=torch.int64)
    if mix == "largest":
        return torch.full((batch,), space.largest_id, dtype=torch.int64)
    generator = torch.Generator().manual_seed(_seed_for("mix", mix, batch, seed))
    if mix == "uniform":
        return torch.randint(0, space.n_configs, (batch,), generator=generator)
    if mix == "paper":
        probs = paper_weights(space, seq_len, num_items)
        return torch.multinomial(probs, batch, replacement=True, generator=generator)
    raise ValueError(f"unknown routing mix {mix!r}; expected one of {MIXES}")


def route_like(model: CANet, probs: Tensor, users: int = 4096, seed: int = DEFAULT_SEED) -> None:
    """Shift ``model``'s router head bias (in place) so that its own argmax routing of seeded
    random full-length histories follows ``probs`` ``[C]`` (e.g. :func:`paper_weights`); the
    head's weight is rescaled too.

    A benchmark that runs the real router (``canet bench --serve``) then serves a realistic mix
    instead of whatever a random router picks (usually one or two configs). The bias only adds
    to the logits, so it is fitted on the logits of ``users`` histories computed once: each
    step moves every config's bias by the log ratio of wanted to routed shares; the bias of the
    step with the smallest total variation from ``probs`` is kept.
    """
    seqs = make_sequences(users, model.num_items, model.max_len, seed + 1)
    head = model.router.head
    with torch.inference_mode():
        logits = model.router(seqs).double() - head.bias.double()
    # A random router's logits vary little between users (std ~0.2) next to their spread
    # between configs: scale the head to a per-user std of 1, so a bias can steer the shares.
    scale = 1.0 / float(logits.std(0).mean())
    logits = logits * scale
    want = probs.double().clamp_min(1e-12)
    bias = -logits.mean(0)
    best, best_bias = math.inf, bias.clone()
    for _ in range(500):
        routed = torch.bincount((logits + bias).argmax(1), minlength=len(want)).double() / users
        error = float((routed - want).abs().sum())
        if error < best:
            best, best_bias = error, bias.clone()
        bias += 0.2 * (want.log() - (routed + 0.5 / users).log())
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.copy_(best_bias.to(head.bias.dtype))


def config_histogram(config_ids: Tensor, space: RoutingSpace) -> list[int]:
    """Users per config id of ``config_ids`` ``[B]``: the histogram
    :func:`canet.flops.batch_flops` counts a routed batch's FLOPs from."""
    return torch.bincount(config_ids.reshape(-1).cpu(), minlength=len(space)).tolist()


# -- what is timed -------------------------------------------------------------------------
def available_backends(
    requested: Sequence[str] = DEFAULT_BACKENDS,
) -> tuple[list[str], dict[str, str]]:
    """(usable backends in request order, {skipped backend: why}) on the CPU device."""
    reasons = backend_registry.availability("cpu")
    usable, skipped = [], {}
    for name in requested:
        if name not in reasons:
            skipped[name] = f"unknown backend; known: {', '.join(reasons)}"
        elif reasons[name] is None:
            usable.append(name)
        else:
            skipped[name] = reasons[name]
    return usable, skipped


def method_calls(
    model: CANet, engines: Mapping[str, Engine], seqs: Tensor, config_ids: Tensor
) -> dict[str, Callable[[], Tensor]]:
    """The timed callables for one batch (``seqs [B, L]``, ``config_ids [B]``): the baselines,
    then per backend routed and largest.

    Each returns the ``[B, N+1]`` scores, so the caller can check backends against the
    reference. Building one-hot choices is part of the masked call, as in the paper's code.
    """
    largest = torch.full_like(config_ids, model.space.largest_id)
    calls: dict[str, Callable[[], Tensor]] = {
        "supernet_dense": lambda: model.score(seqs, largest),
        "masked": lambda: model.score_masked(seqs, model.one_hot(config_ids)),
        "supernet_routed": lambda: model.score(seqs, config_ids),
    }
    for name, engine in engines.items():
        # Bind loop variables as defaults: closures would otherwise all see the last engine.
        calls[name] = lambda e=engine: e.score(seqs, config_ids)
        calls[f"{name}_largest"] = lambda e=engine: e.score(seqs, largest)
    return calls
