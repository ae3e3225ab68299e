"""The ``canet bench`` measurement: users/s of every way to score a batch, per (mix, batch).

Methods (see :func:`canet.bench.method_calls`): ``supernet_dense``, ``masked``,
``supernet_routed``, and per engine backend ``<backend>`` (routed) and ``<backend>_largest``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..engine import Engine
from ..flops import batch_flops, config_flops
from .analysis import case_metrics, max_relative_error
from .timing import Timing, time_call
from .workload import (
    DEFAULT_SEED,
    NUM_ITEMS,
    SEQ_LEN,
    build_model,
    config_histogram,
    make_config_ids,
    make_sequences,
    method_calls,
)

__all__ = ["run"]


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
    flops_one_largest = config_flops(space, seq_len, num_items)[space.largest_id]

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
                errors = {name: max_relative_error(calls[name](), reference)
                          for name in backends}
            histogram = config_histogram(ids, space)
            flops_routed = batch_flops(histogram, space, seq_len, num_items)
            flops_largest = batch * flops_one_largest
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
