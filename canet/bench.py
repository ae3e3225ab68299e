"""Benchmarks of routed inference: ``canet bench`` (also ``python -m canet.bench``).

Measures users/s of every way to score a batch of users, for several routing mixes and batch
sizes, on one fixed model shape (N = 3000 items, L = 50, the paper's routing space, random
weights with non-trivial residual scales):

* ``supernet_dense``  -- the PyTorch supernet with every user at the largest config
  (``model.score(seqs, largest_ids)``): what serving without routing costs;
* ``masked``          -- the paper code's way: the masked path at full width for every user
  (``model.score_masked(seqs, model.one_hot(ids))``);
* ``supernet_routed`` -- the PyTorch supernet running each user's routed config
  (``model.score(seqs, ids)``, the sliced reference);
* ``<backend>``       -- ``Engine(model, backend=...).score(seqs, ids)``, users grouped by config;
* ``<backend>_largest`` -- the same engine with every user forced to the largest config.

How to read the results: the *ideal speedup* of a batch is FLOPs(every user at the largest
config) / FLOPs(the batch's routed configs), from :mod:`canet.flops`; a backend's *measured
speedup* is time(same backend, all largest) / time(same backend, routed), and its *efficiency*
is measured / ideal: 1.0 means routing saves exactly the time its FLOPs say it should.

This module is the ONE place the model, the inputs and the routing mixes are built; the
pytest-benchmark suite in ``benches/`` imports them from here, so both report the same thing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import backends as backend_registry
from ._version import __version__
from .engine import Engine
from .flops import flops
from .model import CANet
from .space import RoutingSpace

__all__ = [
    "BATCHES",
    "DEFAULT_BACKENDS",
    "MIXES",
    "NUM_ITEMS",
    "PAPER_FLOPS_FRACTION",
    "SEQ_LEN",
    "TARGETS",
    "TargetSpec",
    "Timing",
    "available_backends",
    "build_model",
    "case_metrics",
    "config_fractions",
    "efficiency",
    "evaluate_targets",
    "ideal_speedup",
    "machine_info",
    "main",
    "make_config_ids",
    "make_sequences",
    "method_calls",
    "paper_weights",
    "routed_flops",
    "run",
    "speedup",
    "time_call",
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

# A backend whose float32 scores differ from the PyTorch reference by more than this (relative
# to the largest score) is flagged in the output: fast but wrong numbers are worthless.
MAX_REL_ERROR = 1e-3

# Methods that do not involve an engine backend, in table order.
BASELINES: tuple[str, ...] = ("supernet_dense", "masked", "supernet_routed")


# -- model and inputs ------------------------------------------------------------------------
def build_model(
    num_items: int = NUM_ITEMS,
    seq_len: int = SEQ_LEN,
    space: RoutingSpace | None = None,
    seed: int = DEFAULT_SEED,
) -> CANet:
    """A float32 CANet in eval mode with seeded random weights.

    Residual scales are drawn in [0.5, 1.0] instead of the paper's 1e-8 init: with 1e-8 every
    block is (almost) an identity and tiny products can hit denormal floats, which would make
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
    costs = torch.tensor(
        [flops(c, seq_len, num_items) for c in space.configs], dtype=torch.float64
    )
    return costs / costs[space.largest_id]


PAPER_SMALL_RATIO = 0.8  # geometric decay over the FLOPs rank of the "easy users" component


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


def routed_flops(config_ids: Tensor, space: RoutingSpace, seq_len: int, num_items: int) -> int:
    """Supernet FLOPs of a batch routed to ``config_ids`` (the engine's own count)."""
    per_config = [flops(c, seq_len, num_items) for c in space.configs]
    return sum(per_config[i] for i in config_ids.tolist())


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
    """The timed callables for one batch: the baselines, then per backend routed and largest.

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


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed repeats of one call (after warm-up)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_dict(self, batch: int) -> dict:
        return {
            "median_s": self.median,
            "users_per_s": batch / self.median,
            "repeats": len(self.times),
            "min_s": min(self.times),
            "max_s": max(self.times),
        }


def time_call(
    fn: Callable[[], object],
    min_time: float = 1.0,
    min_repeats: int = 3,
    warmup_time: float = 0.2,
    max_repeats: int = 10_000,
) -> Timing:
    """Median-ready timings of ``fn`` under ``torch.inference_mode()``.

    Warm-up: at least one call, then more until ``warmup_time`` has passed (first calls pay for
    allocator growth and lazy initialisation). Timing: repeat until both ``min_time`` seconds
    and ``min_repeats`` calls are reached (or ``max_repeats``), so a slow call (the masked path
    at batch 512) costs a few repeats and a fast one gets many. The garbage collector is off
    while timing (as in ``timeit``) so its pauses do not land in one repeat; no forced collection
    first, as a full collection of torch's heap costs ~0.3 s per measurement.
    """
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < warmup_time:
                fn()
            total = 0.0
            while (total < min_time or len(times) < min_repeats) and len(times) < max_repeats:
                begin = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - begin
                times.append(elapsed)
                total += elapsed
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(tuple(times))


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
    holds ``speedup_vs_largest``, ``efficiency``, ``speedup_vs_dense``, ``speedup_vs_masked``
    and ``speedup_vs_supernet_routed`` for whichever of their inputs were measured.
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
                verdict.update(status="not measured", reason=reason)
            else:
                verdict.update(value=value, status="met" if value >= spec.threshold else "missed")
            verdicts.append(verdict)
    return verdicts


# -- machine facts -------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> dict[str, object] | None:
    """HEAD of the checkout canet is imported from, and whether tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine_info() -> dict[str, object]:
    """Where the numbers come from: CPU, cores, threads, versions, git commit, date."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "canet": __version__,
        "git": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# -- the run ---------------------------------------------------------------------------------
def _max_relative_error(got: Tensor, want: Tensor) -> float:
    """Largest |difference| over the reference's largest |score| (column 0 is -inf: skipped)."""
    scale = want[:, 1:].abs().max().clamp_min(1e-30)
    return ((got[:, 1:] - want[:, 1:]).abs().max() / scale).item()


def run(
    batches: Sequence[int],
    mixes: Sequence[str],
    backends: Sequence[str],
    num_items: int = NUM_ITEMS,
    seq_len: int = SEQ_LEN,
    seed: int = DEFAULT_SEED,
    min_time: float = 1.0,
    min_repeats: int = 3,
    warmup_time: float = 0.2,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict], list[str]]:
    """Measure every (mix, batch); returns (case records, backends actually run)."""
    model = build_model(num_items, seq_len, seed=seed)
    space = model.space
    engines = {name: Engine(model, backend=name) for name in backends}
    per_config = [flops(c, seq_len, num_items) for c in space.configs]

    def measure(label: str, fn: Callable[[], object], batch: int) -> Timing:
        timing = time_call(fn, min_time, min_repeats, warmup_time)
        log(f"  B={batch:<4} {label:<22} {timing.median * 1e3:10.2f} ms/call "
            f"({len(timing.times)} repeats)")
        return timing

    cases = []
    for batch in batches:
        seqs = make_sequences(batch, num_items, seq_len, seed)
        # Everything at the largest config (and the masked path, which is full width whatever
        # the choice) is independent of the mix: measured once per batch size.
        any_ids = make_config_ids("largest", batch, space, seq_len, num_items, seed)
        calls = method_calls(model, engines, seqs, any_ids)
        shared = {"supernet_dense": measure("supernet_dense", calls["supernet_dense"], batch),
                  "masked": measure("masked", calls["masked"], batch)}
        for name in backends:
            shared[f"{name}_largest"] = measure(f"{name}_largest", calls[f"{name}_largest"],
                                                batch)
        for mix in mixes:
            ids = make_config_ids(mix, batch, space, seq_len, num_items, seed)
            calls = method_calls(model, engines, seqs, ids)
            timings = dict(shared)
            for method in ("supernet_routed", *backends):
                timings[method] = measure(f"{mix} {method}", calls[method], batch)
            with torch.inference_mode():
                reference = calls["supernet_routed"]()
                errors = {name: _max_relative_error(calls[name](), reference)
                          for name in backends}
            histogram = torch.bincount(ids, minlength=space.n_configs).tolist()
            flops_routed = sum(n * f for n, f in zip(histogram, per_config, strict=True))
            flops_largest = batch * per_config[space.largest_id]
            metrics = case_metrics({k: t.median for k, t in timings.items()},
                                   flops_routed, flops_largest, backends)
            for name in backends:
                metrics["backends"][name]["users_per_s"] = batch / timings[name].median
                metrics["backends"][name]["max_rel_error"] = errors[name]
            cases.append({
                "mix": mix,
                "batch": batch,
                "groups": sum(1 for n in histogram if n),
                "histogram": histogram,
                "flops_routed": flops_routed,
                "flops_largest": flops_largest,
                **metrics,
                "timings": {k: t.to_dict(batch) for k, t in timings.items()},
            })
    return cases, list(backends)


# -- reporting -------------------------------------------------------------------------------
def _rate(users_per_s: float | None) -> str:
    if users_per_s is None:
        return "-"
    if users_per_s >= 1e6:
        return f"{users_per_s / 1e6:.2f}M"
    if users_per_s >= 1e3:
        return f"{users_per_s / 1e3:.2f}k"
    return f"{users_per_s:.1f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def table_rows(cases: Sequence[Mapping], backends: Sequence[str]) -> tuple[list[str], list[list]]:
    """(header, rows) of the compact table: one row per (mix, batch)."""
    header = ["mix", "B", "flops", "ideal", "dense u/s", "masked u/s", "sliced u/s"]
    for name in backends:
        header += [f"{name} u/s", f"{name} eff", f"{name} xdense", f"{name} xmasked"]
    rows = []
    for case in cases:
        timings = case["timings"]
        row = [
            case["mix"], str(case["batch"]), f"{case['flops_fraction']:.2f}",
            f"{case['ideal_speedup']:.2f}",
            _rate(timings["supernet_dense"]["users_per_s"]),
            _rate(timings["masked"]["users_per_s"]),
            _rate(timings["supernet_routed"]["users_per_s"]),
        ]
        for name in backends:
            entry = case["backends"].get(name, {})
            row += [
                _rate(entry.get("users_per_s")), _num(entry.get("efficiency")),
                _num(entry.get("speedup_vs_dense")), _num(entry.get("speedup_vs_masked")),
            ]
        rows.append(row)
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned text table: the mix column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 1 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_targets(verdicts: Sequence[Mapping]) -> list[str]:
    lines = []
    for v in verdicts:
        where = f"{v['mix'] or 'any'} B={v['batch']}"
        value = "" if v["value"] is None else f" (got {v['value']:.2f}, need {v['threshold']})"
        reason = f": {v['reason']}" if v.get("reason") else ""
        lines.append(f"[{v['status']}] {where}: {v['text']}{value}{reason}")
    return lines


def markdown(report: Mapping) -> str:
    """The report as Markdown: machine, settings, the table, the targets."""
    machine, settings = report["machine"], report["settings"]
    header, rows = table_rows(report["results"], settings["backends_run"])
    git = machine.get("git") or {}
    commit = git.get("commit", "unknown") + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"# canet bench ({machine['date']})",
        "",
        f"- CPU: {machine['cpu_model']} ({machine['usable_cores']} usable cores), "
        f"torch {machine['torch']}, {machine['torch_threads']} threads",
        f"- canet {machine['canet']}, commit {commit}",
        f"- shape: N={settings['num_items']} items, L={settings['seq_len']}, "
        f"{settings['n_configs']} configs, float32, inference_mode",
        f"- timing: median of repeats after warm-up, >= {settings['min_time']} s and "
        f">= {settings['min_repeats']} repeats per measurement"
        + (" (quick)" if settings["quick"] else ""),
    ]
    for name, why in settings["backends_skipped"].items():
        lines.append(f"- backend `{name}` not measured: {why}")
    lines += [
        "",
        "flops = routed FLOPs / all-largest FLOPs; ideal = 1 / flops; eff = (same backend "
        "all-largest time / routed time) / ideal; xdense, xmasked = speedup over the PyTorch "
        "supernet dense and the masked path; u/s = users per second.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in format_targets(report["targets"])),
        "",
    ]
    return "\n".join(lines)


def write_plots(report: Mapping, directory: Path) -> list[Path]:
    """PNG per mix (users/s vs batch size for every method) and one of efficiency vs batch."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    directory.mkdir(parents=True, exist_ok=True)
    cases = report["results"]
    batches = sorted({c["batch"] for c in cases})
    written = []

    def batch_axis(ax) -> None:
        # Ticks at the measured batch sizes, as plain numbers (log axes default to 10^k).
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())

    for mix in dict.fromkeys(c["mix"] for c in cases):
        mine = sorted((c for c in cases if c["mix"] == mix), key=lambda c: c["batch"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in mine[0]["timings"]:
            ax.plot([c["batch"] for c in mine],
                    [c["timings"][method]["users_per_s"] for c in mine], marker="o",
                    label=method)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="users / s",
               title=f"canet bench: {mix} mix")
        batch_axis(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = directory / f"users_per_s-{mix}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in report["settings"]["backends_run"]:
        for mix in dict.fromkeys(c["mix"] for c in cases):
            mine = sorted((c for c in cases if c["mix"] == mix), key=lambda c: c["batch"])
            # The largest mix has ideal speedup 1: its line only shows measurement noise.
            ax.plot([c["batch"] for c in mine],
                    [c["backends"][name].get("efficiency", math.nan) for c in mine],
                    marker="o", linestyle=":" if mix == "largest" else "-",
                    label=f"{name} {mix}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set(xscale="log", xlabel="batch size", ylabel="efficiency (measured / ideal speedup)",
           title="routing efficiency per backend")
    batch_axis(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = directory / "efficiency.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


# -- command line ----------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return list(dict.fromkeys(names))

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canet bench",
        description="Users/s of routed inference vs the dense and masked PyTorch paths.",
    )
    parser.add_argument("--batch", type=_int_list, default=",".join(map(str, BATCHES)),
                        help="batch sizes (default: %(default)s)")
    parser.add_argument("--mix", type=_name_list(MIXES), default=",".join(MIXES),
                        help="routing mixes (default: %(default)s)")
    parser.add_argument("--backends", type=_name_list(backend_registry.BACKENDS),
                        default=",".join(DEFAULT_BACKENDS),
                        help="engine backends; unavailable ones are skipped with the reason "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output; a .md table is written beside it "
                             "(default: benches/results/cpu-<date>.json)")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR",
                        help="also write PNG plots to DIR (needs matplotlib)")
    parser.add_argument("--quick", action="store_true",
                        help="short timing budget (development; numbers are rough)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's current setting)")
    parser.add_argument("--items", type=int, default=NUM_ITEMS,
                        help="number of items N (default: %(default)s; change only to test)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN,
                        help="sequence length L (default: %(default)s; change only to test)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of model and inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``canet bench``: run, print the table and targets, write JSON + Markdown (+ plots)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            # Fail before minutes of measuring, not after.
            print("canet bench: --plot needs matplotlib, which is not installed; "
                  "run `pip install matplotlib` or drop --plot", file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.items < 1 or args.seq_len < 1:
        parser.error("--items and --seq-len must be >= 1")

    backends, skipped = available_backends(args.backends)
    for name, why in skipped.items():
        print(f"canet bench: skipping the {name} backend: {why}", file=sys.stderr)
    min_time, min_repeats, warmup_time = (0.05, 1, 0.0) if args.quick else (1.0, 3, 0.2)
    out = args.out or Path("benches/results") / f"cpu-{dt.date.today().isoformat()}.json"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"canet bench: N={args.items}, L={args.seq_len}, threads={torch.get_num_threads()}, "
        f"backends={','.join(backends) or 'none'}{' (quick)' if args.quick else ''}")
    cases, backends_run = run(
        args.batch, args.mix, backends, args.items, args.seq_len, args.seed,
        min_time, min_repeats, warmup_time, log,
    )
    space = RoutingSpace()
    report = {
        "schema": 1,
        "machine": machine_info(),
        "settings": {
            "num_items": args.items,
            "seq_len": args.seq_len,
            "space": space.to_dict(),
            "n_configs": space.n_configs,
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "batches": args.batch,
            "mixes": args.mix,
            "backends_requested": args.backends,
            "backends_run": backends_run,
            "backends_skipped": skipped,
            "paper_flops_fraction_target": PAPER_FLOPS_FRACTION,
            "seed": args.seed,
            "quick": args.quick,
            "min_time": min_time,
            "min_repeats": min_repeats,
            "warmup_time": warmup_time,
            "standard_shape": (args.items, args.seq_len) == (NUM_ITEMS, SEQ_LEN),
        },
        "results": cases,
        "targets": evaluate_targets(cases, skipped),
    }
    machine = report["machine"]
    print(f"canet bench: {machine['cpu_model']}, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, N={args.items}, L={args.seq_len}"
          + (" (quick: rough numbers)" if args.quick else ""))
    for name, why in skipped.items():
        print(f"{name} backend not measured: {why}")
    header, rows = table_rows(cases, backends_run)
    print(format_table(header, rows))
    for case in cases:
        for name, entry in case["backends"].items():
            if entry["max_rel_error"] > MAX_REL_ERROR:
                print(f"WARNING: {name} scores differ from model.score by "
                      f"{entry['max_rel_error']:.1e} (relative) at {case['mix']} "
                      f"B={case['batch']}")
    print()
    print("targets:")
    for line in format_targets(report["targets"]):
        print(f"  {line}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out.with_suffix(".md")
    md_path.write_text(markdown(report), encoding="utf-8")
    print(f"\nwrote {out} and {md_path}")
    if args.plot is not None:
        for path in write_plots(report, args.plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
