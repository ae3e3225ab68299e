"""The ``canet bench`` measurement: users/s of every way to score a batch, per (mix, batch).

Methods (see :func:`canet.bench.method_calls`): ``supernet_dense``, ``masked``,
``supernet_routed``, and per engine backend ``<backend>`` (routed) and ``<backend>_largest``;
with the ``ort`` baseline also ONNX Runtime on the fixed sub-network of equal FLOPs and on the
largest config (:mod:`canet.bench.onnx_baseline`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..engine import Engine
from ..flops import batch_flops, config_flops
from .analysis import ORT_LARGEST, case_metrics, max_relative_error, speedup
from .onnx_baseline import ORT, OrtSubnetworks, bracket
from .timing import Timing, time_call, time_interleaved
from .workload import (
    DEFAULT_SEED,
    NUM_ITEMS,
    SEQ_LEN,
    build_model,
    config_fractions,
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
    baselines: Sequence[str] = (),
) -> tuple[list[dict], list[str]]:
    """Measure every (mix, batch); returns (case records, backends actually run).

    ``baselines``: extra baselines to run, ``"ort"`` (:mod:`canet.bench.onnx_baseline`: ONNX
    Runtime on the fixed sub-network of equal FLOPs and on the largest config; the caller
    checks that it is available)."""
    model = build_model(num_items, seq_len, seed=seed)
    space = model.space
    engines = {name: Engine(model, backend=name) for name in backends}
    flops_one_largest = config_flops(space, seq_len, num_items)[space.largest_id]
    fractions = config_fractions(space, seq_len, num_items).tolist()

    def measure(label: str, fn: Callable[[], object], batch: int) -> Timing:
        timing = time_call(fn, min_time, min_repeats, warmup_time)
        log(f"  B={batch:<4} {label:<22} {timing.median * 1e3:10.2f} ms/call "
            f"({len(timing.times)} repeats)")
        return timing

    ort = OrtSubnetworks(model, torch.get_num_threads(), log) if ORT in baselines else None
    ort_errors: dict[int, float] = {}

    def ort_case(seqs, flops_fraction: float, routed: dict[str, Callable[[], object]]) -> dict:
        """ONNX Runtime at the two configs nearest in FLOPs, timed interleaved with the
        engines' routed calls (a ratio of back-to-back medians would carry the machine's
        drift); the record of ``case["ort"]``."""
        batch = seqs.shape[0]
        lower, upper, weight = bracket(fractions, flops_fraction)
        calls = {f"ort config {c}": ort.call(c, seqs) for c in dict.fromkeys((lower, upper))}
        for config_id in (lower, upper):
            if config_id not in ort_errors:
                with torch.inference_mode():
                    want = model.score(seqs, torch.full((batch,), config_id))
                ort_errors[config_id] = max_relative_error(calls[f"ort config {config_id}"](),
                                                           want)
        timings = time_interleaved({**calls, **routed}, min_time * len(calls | routed),
                                   rounds=5, warmup_time=warmup_time)
        for label, timing in timings.items():
            log(f"  B={batch:<4} {label + ' (interleaved)':<34} {timing.median * 1e3:10.2f} "
                f"ms/call ({len(timing.times)} repeats)")
        lower_s = timings[f"ort config {lower}"].median
        upper_s = timings[f"ort config {upper}"].median
        equal = (1 - weight) * lower_s + weight * upper_s
        return {"lower": lower, "upper": upper, "upper_weight": weight,
                "lower_s": lower_s, "upper_s": upper_s, "equal_flops_s": equal,
                "equal_flops_users_per_s": batch / equal,
                "routed_s": {name: timings[name].median for name in routed},
                "max_rel_error": max(ort_errors[lower], ort_errors[upper])}

    try:
        cases = _cases(batches, mixes, backends, model, engines, measure, seq_len, num_items,
                       seed, flops_one_largest, ort, ort_case)
    finally:
        if ort is not None:
            ort.close()
    return cases, list(backends)


def _cases(batches, mixes, backends, model, engines, measure, seq_len, num_items, seed,
           flops_one_largest, ort, ort_case) -> list[dict]:
    space = model.space
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
        ort_largest = None
        if ort is not None:
            ort_largest = measure("ort largest", ort.call(space.largest_id, seqs), batch).median
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
            seconds = {k: t.median for k, t in timings.items()}
            ort_record = None
            if ort is not None:
                ort_record = ort_case(seqs, flops_routed / flops_largest,
                                      {name: calls[name] for name in backends})
                ort_record["largest_s"] = ort_largest
                seconds[ORT_LARGEST] = ort_largest
            metrics = case_metrics(seconds, flops_routed, flops_largest, backends)
            if ort_record is not None:
                # Against ONNX Runtime: the engines' times from the interleaved rounds.
                for name in backends:
                    metrics["backends"][name]["speedup_vs_ort_equal_flops"] = speedup(
                        ort_record["equal_flops_s"], ort_record["routed_s"][name])
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
                **({} if ort_record is None else {ORT: ort_record}),
            })
    return cases
