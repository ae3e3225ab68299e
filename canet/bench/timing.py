"""The one timer of every benchmark: wall clock on the CPU, CUDA events on a GPU.

``canet bench``, the GPU benchmarks in ``benches/`` and ``canet demo`` all time through
:func:`time_call` (or its fixed-count form :func:`time_repeats`), so every number they report
is a median of repeats after warm-up, measured the same way.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.base import capture_cuda_graph

__all__ = ["CLOCKS", "Timing", "graph_of", "time_call", "time_interleaved", "time_repeats"]

# "wall": time.perf_counter around each call (the call must finish on return: CPU work).
# "cuda": a pair of CUDA events around each call, read after the end event completes: the
# device time of the work the call queued, without the host-side launch gaps between calls.
CLOCKS: tuple[str, ...] = ("wall", "cuda")


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed repeats of one call (after warm-up)."""

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
    *,
    warmup_calls: int = 1,
    clock: str = "wall",
) -> Timing:
    """Median-ready timings of ``fn`` under ``torch.inference_mode()``.

    Warm-up: ``warmup_calls`` calls, then more until ``warmup_time`` has passed (first calls
    pay for allocator growth, lazy initialisation and kernel compiles). Timing: repeat until
    both ``min_time`` seconds and ``min_repeats`` calls are reached (or ``max_repeats``), so a
    slow call (the masked path at batch 512) costs a few repeats and a fast one gets many. The
    garbage collector is off while timing (as in ``timeit``) so its pauses do not land in one
    repeat; no forced collection first, as a full collection of torch's heap costs ~0.3 s per
    measurement. ``clock`` is one of :data:`CLOCKS`; with ``"cuda"`` the device is synchronized
    after the warm-up so queued warm-up work is not timed.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if min_repeats < 1 or max_repeats < 1 or warmup_calls < 0:
        raise ValueError(
            "min_repeats and max_repeats must be >= 1 and warmup_calls >= 0, got "
            f"{min_repeats}, {max_repeats} and {warmup_calls}"
        )
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(warmup_calls):
                fn()
            while time.perf_counter() - start < warmup_time:
                fn()
            if clock == "cuda":
                torch.cuda.synchronize()
            total = 0.0
            while (total < min_time or len(times) < min_repeats) and len(times) < max_repeats:
                elapsed = _cuda_seconds(fn) if clock == "cuda" else _wall_seconds(fn)
                times.append(elapsed)
                total += elapsed
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(tuple(times))


def time_repeats(
    fn: Callable[[], object], repeats: int, warmup_calls: int = 1, clock: str = "wall"
) -> Timing:
    """Exactly ``repeats`` timed calls of ``fn`` after ``warmup_calls`` untimed ones
    (:func:`time_call` with no time budget)."""
    return time_call(fn, min_time=0.0, min_repeats=repeats, warmup_time=0.0,
                     max_repeats=repeats, warmup_calls=warmup_calls, clock=clock)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    min_time: float = 1.0,
    rounds: int = 5,
    warmup_time: float = 0.2,
) -> dict[str, Timing]:
    """:func:`time_call` of several callables in ``rounds`` interleaved rounds, the repeats
    of all rounds pooled per callable. Each round times every callable for ``min_time /
    rounds`` seconds (at least one call, after one untimed call: the others ran in between).
    A ratio of two medians is then not skewed by the machine getting busier or quieter
    between two back-to-back measurements."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pooled: dict[str, list[float]] = {name: [] for name in fns}
    for index in range(rounds):
        for name, fn in fns.items():
            timing = time_call(fn, min_time / rounds, 1, warmup_time if index == 0 else 0.0)
            pooled[name].extend(timing.times)
    return {name: Timing(tuple(times)) for name, times in pooled.items()}


def _wall_seconds(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _cuda_seconds(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def graph_of(fn: Callable[[], object]) -> Callable[[], None]:
    """Record ``fn`` (static inputs) in a CUDA graph; returns the replay callable. The capture
    is :func:`canet.backends.base.capture_cuda_graph` (warm-up on a side stream, then one
    recorded call), in the caller's inference mode."""
    graph = capture_cuda_graph(fn, inference_mode=torch.is_inference_mode_enabled())
    return graph.replay
