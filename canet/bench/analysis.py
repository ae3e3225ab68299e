"""What the measurements mean: routing efficiency, the CPU performance targets, and whether a
fast path's scores are right.

The *ideal speedup* of a batch is FLOPs(every user at the largest config) / FLOPs(the batch's
routed configs), from :mod:`canet.flops`; a backend's *measured speedup* is time(same backend,
all largest) / time(same backend, routed), and its *efficiency* is measured / ideal: 1.0 means
routing saves exactly the time its FLOPs say it should.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import CANet

__all__ = [
    "DTYPE_ATOL",
    "ORT_LARGEST",
    "MAX_REL_ERROR",
    "ScoreCheck",
    "TARGETS",
    "TargetSpec",
    "case_metrics",
    "check_scores",
    "efficiency",
    "evaluate_targets",
    "ideal_speedup",
    "max_relative_error",
    "speedup",
]

# A backend whose float32 scores differ from the PyTorch reference by more than this (relative
# to the largest score) is flagged in the output: fast but wrong numbers are worthless.
MAX_REL_ERROR = 1e-3

# The absolute part of the dtype rule (:func:`check_scores`), relative to the largest score:
# the GPU tests' tolerances (the Triton backend issue's rule, FlashAttention's).
DTYPE_ATOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 5e-3,
}


# The ONNX Runtime baseline's largest config (canet.bench.onnx_baseline); its fixed sub-network
# of equal FLOPs is compared with in measure.py, from timings interleaved with the engines'.
ORT_LARGEST = "ort_largest"


# -- arithmetic ------------------------------------------------------------------------------
def ideal_speedup(flops_largest: int, flops_routed: int) -> float:
    """FLOPs(every user at the largest config) / FLOPs(the routed batch)."""
    if flops_routed <= 0:
        raise ValueError(f"routed FLOPs must be positive, got {flops_routed}")
    return flops_largest / flops_routed


def speedup(baseline_s: float, candidate_s: float) -> float:
    """How many times faster the candidate is than the baseline (time ratio)."""
    return baseline_s / candidate_s


def efficiency(largest_s: float, routed_s: float, ideal: float) -> float:
    """Measured speedup of routing on one backend (all-largest time / routed time) over the
    ideal FLOPs speedup: 1.0 = every saved FLOP is saved time."""
    return speedup(largest_s, routed_s) / ideal


def case_metrics(
    seconds: Mapping[str, float],
    flops_routed: int,
    flops_largest: int,
    backends: Sequence[str],
) -> dict:
    """Derived numbers of one (mix, batch) from median seconds per method.

    Returns ``{"ideal_speedup", "flops_fraction", "backends": {name: {...}}}``; a backend entry
    holds ``speedup_vs_largest``, ``efficiency``, ``speedup_vs_dense``, ``speedup_vs_masked``,
    ``speedup_vs_supernet_routed`` and ``speedup_vs_ort_largest`` for whichever of their
    inputs were measured (``speedup_vs_ort_equal_flops`` is added by the ``ort`` baseline's
    interleaved timing, :func:`canet.bench.run`).
    """
    ideal = ideal_speedup(flops_largest, flops_routed)
    per_backend = {}
    for name in backends:
        if name not in seconds:
            continue
        routed = seconds[name]
        entry: dict[str, float] = {}
        if f"{name}_largest" in seconds:
            entry["speedup_vs_largest"] = speedup(seconds[f"{name}_largest"], routed)
            entry["efficiency"] = efficiency(seconds[f"{name}_largest"], routed, ideal)
        for key, baseline in (
            ("speedup_vs_dense", "supernet_dense"),
            ("speedup_vs_masked", "masked"),
            ("speedup_vs_supernet_routed", "supernet_routed"),
            ("speedup_vs_ort_largest", ORT_LARGEST),
        ):
            if baseline in seconds:
                entry[key] = speedup(seconds[baseline], routed)
        per_backend[name] = entry
    return {
        "ideal_speedup": ideal,
        "flops_fraction": flops_routed / flops_largest,
        "backends": per_backend,
    }


# -- targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    """A performance goal: ``case["backends"][backend][metric] >= threshold``.

    ``mix=None`` means every mix measured at ``batch`` (one verdict per mix).
    """

    key: str
    backend: str
    mix: str | None
    batch: int
    metric: str
    threshold: float
    text: str
    needs: str | None = None  # a baseline the metric compares with ("ort"), besides backend


TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec("cpu-efficiency-paper-B512", "cpu", "paper", 512, "efficiency", 0.95,
               "cpu routed vs cpu all-largest efficiency >= 0.95"),
    TargetSpec("cpu-vs-dense-paper-B512", "cpu", "paper", 512, "speedup_vs_dense", 2.5,
               "cpu routed >= 2.5x the PyTorch supernet dense"),
    TargetSpec("cpu-vs-masked-paper-B512", "cpu", "paper", 512, "speedup_vs_masked", 5.0,
               "cpu routed >= 5x the masked path"),
    TargetSpec("cpu-efficiency-paper-B8", "cpu", "paper", 8, "efficiency", 0.7,
               "cpu routed vs cpu all-largest efficiency >= 0.7"),
    TargetSpec("cpu-vs-supernet-routed-B1", "cpu", None, 1, "speedup_vs_supernet_routed", 1.0,
               "cpu not slower than the PyTorch supernet running the user's routed config"),
    TargetSpec("torch-vs-dense-B512", "torch", None, 512, "speedup_vs_dense", 1.0,
               "torch backend routed not slower than the PyTorch supernet dense"),
    TargetSpec("cpu-vs-ort-B1", "cpu", None, 1, "speedup_vs_ort_equal_flops", 1.0,
               "cpu routed at least as fast as ONNX Runtime on the fixed sub-network of equal "
               "FLOPs", needs="ort"),
    TargetSpec("cpu-vs-ort-B8", "cpu", None, 8, "speedup_vs_ort_equal_flops", 1.0,
               "cpu routed at least as fast as ONNX Runtime on the fixed sub-network of equal "
               "FLOPs", needs="ort"),
)


def evaluate_targets(
    cases: Sequence[Mapping], skipped: Mapping[str, str] | None = None
) -> list[dict]:
    """One verdict per target (and per mix for ``mix=None`` targets): ``status`` is ``met``,
    ``missed`` or ``not measured`` (with ``reason``)."""
    skipped = skipped or {}
    verdicts = []
    for spec in TARGETS:
        matching = [
            c for c in cases
            if c["batch"] == spec.batch and (spec.mix is None or c["mix"] == spec.mix)
        ]
        base = {"target": spec.key, "text": spec.text, "backend": spec.backend,
                "batch": spec.batch, "metric": spec.metric, "threshold": spec.threshold}
        if not matching:
            what = f"mix {spec.mix}" if spec.mix else "any mix"
            verdicts.append({**base, "mix": spec.mix, "value": None, "status": "not measured",
                             "reason": f"batch {spec.batch} with {what} was not run"})
            continue
        for case in matching:
            verdict = {**base, "mix": case["mix"], "value": None}
            value = case["backends"].get(spec.backend, {}).get(spec.metric)
            if value is None:
                reason = skipped.get(spec.backend, f"{spec.backend} backend was not run")
                if spec.needs and spec.backend not in skipped:
                    reason = skipped.get(spec.needs,
                                         f"the {spec.needs} baseline was not run "
                                         f"(--baselines {spec.needs})")
                verdict.update(status="not measured", reason=reason)
            else:
                verdict.update(value=value, status="met" if value >= spec.threshold else "missed")
            verdicts.append(verdict)
    return verdicts


# -- correctness of the scores ---------------------------------------------------------------
def max_relative_error(got: Tensor, want: Tensor) -> float:
    """Largest |difference| of ``[B, N+1]`` scores over the reference's largest |score|
    (column 0, the padding item, is -inf in both: skipped)."""
    if got.shape != want.shape or got.dim() != 2:
        raise ValueError(
            f"scores must both be [B, N+1] of one shape, got {tuple(got.shape)} and "
            f"{tuple(want.shape)}"
        )
    scale = want[:, 1:].abs().max().clamp_min(1e-30)
    return ((got[:, 1:] - want[:, 1:]).abs().max() / scale).item()


@dataclass(frozen=True)
class ScoreCheck:
    """The verdict of :func:`check_scores`; errors relative to the largest reference score."""

    error: float  # of the scores under test, against the float64 reference
    supernet_error: float  # of the PyTorch supernet in the same dtype, against the same
    atol: float
    bound: float  # 2 * supernet_error + atol
    ok: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {"error": self.error, "supernet_error": self.supernet_error,
                "atol": self.atol, "bound": self.bound, "ok": self.ok}


def check_scores(
    got: Tensor,
    model: CANet,
    seqs: Tensor,
    config_ids: Tensor,
    reference: CANet | None = None,
) -> ScoreCheck:
    """Judge scores ``got`` ``[B, N+1]`` of users ``seqs`` ``[B, L]`` routed to ``config_ids``
    ``[B]`` by the dtype rule of the GPU tests (the Triton backend issue's, FlashAttention's).

    ``model`` is the CANet in the dtype being judged: its weights are the dtype-rounded ones
    the fast path used. The error of ``got`` against a float64 reference computed with those
    same rounded weights must be at most twice the PyTorch supernet's own error in that dtype
    (``model.score``), plus :data:`DTYPE_ATOL` of the dtype; both relative to the largest
    reference score. ``reference`` is ``model`` in float64 (pass it to check many batches of
    one model without copying it each time; default: a float64 copy of ``model``).

    The rule calibrates itself to how much the dtype's rounding moves this model's scores, so
    it judges attention and FFN errors only when the blocks matter: with the paper's 1e-8
    residual scales every block is an identity and no error inside one reaches the scores
    (build benchmark models with :func:`canet.bench.build_model`).
    """
    dtype = model.supernet.out.weight.dtype
    if dtype not in DTYPE_ATOL:
        raise ValueError(f"model dtype must be one of {list(DTYPE_ATOL)}, got {dtype}")
    if got.dtype != dtype:
        raise ValueError(f"scores must be in the model's dtype {dtype}, got {got.dtype}")
    if reference is None:
        reference = copy.deepcopy(model).double()
    with torch.inference_mode():
        want = reference.score(seqs, config_ids)
        supernet = model.score(seqs, config_ids)
    error = max_relative_error(got.double(), want)
    supernet_error = max_relative_error(supernet.double(), want)
    atol = DTYPE_ATOL[dtype]
    bound = 2.0 * supernet_error + atol
    ok = math.isfinite(error) and error <= bound and bool(torch.isneginf(got[:, 0]).all())
    return ScoreCheck(error, supernet_error, atol, bound, ok)
