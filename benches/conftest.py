"""pytest-benchmark setup for ``benches/``: collection, thread count, shared model, and a
summary of routing efficiency and the performance targets after the run.

Run: ``make bench`` (= ``pytest benches/ --benchmark-only``). See benches/README.md.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

from canet import Engine, bench

# Fix the intra-op thread count once, before anything is timed, so every benchmark of a run
# uses the same parallelism (default: torch's own choice, usually the number of cores).
_THREADS = os.environ.get("CANET_BENCH_THREADS")
if _THREADS:
    torch.set_num_threads(int(_THREADS))


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default patterns only know ``test_*.py``)."""
    # A file named on the command line is collected by pytest itself: not a second time.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the canet CLI records (CPU model, threads, versions, commit) in the JSON
    that ``--benchmark-json`` / ``--benchmark-autosave`` write."""
    machine_info["canet"] = bench.machine_info()


@pytest.fixture(scope="session")
def bench_model():
    """The benchmark model (N=3000, L=50, paper space), built once per session."""
    return bench.build_model()


@pytest.fixture(scope="session")
def bench_engines(bench_model):
    """One Engine per available backend of :data:`canet.bench.DEFAULT_BACKENDS`."""
    usable, _ = bench.available_backends()
    return {name: Engine(bench_model, backend=name) for name in usable}


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's tables: efficiency per (mix, batch) and the target verdicts,
    computed from the medians with the same arithmetic as ``canet bench``."""
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's (private) session
    benchmarks = getattr(session, "benchmarks", None) or []
    _serve_summary(terminalreporter, benchmarks)
    seconds: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    info: dict[tuple[str, int], dict] = {}
    for result in benchmarks:
        extra = getattr(result, "extra_info", {}) or {}
        if "mix" not in extra or not result:
            continue
        key = (extra["mix"], extra["batch"])
        seconds[key][extra["method"]] = result.stats.median
        info[key] = extra
    if not seconds:
        return
    _, skipped = bench.available_backends()
    backends = [b for b in bench.DEFAULT_BACKENDS if b not in skipped]
    cases = []
    for (mix, batch), by_method in sorted(seconds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        extra = info[(mix, batch)]
        metrics = bench.case_metrics(by_method, extra["flops_routed"], extra["flops_largest"],
                                     backends)
        cases.append({"mix": mix, "batch": batch, **metrics})
    write = terminalreporter.write_line
    terminalreporter.section("canet routing efficiency (medians)")
    write(f"threads: {torch.get_num_threads()}; eff = (backend all-largest / backend routed) "
          "/ ideal FLOPs speedup")
    for case in cases:
        if not any(case["backends"].values()):
            continue  # a -k slice without this group's routed runs: nothing to compare
        parts = [f"{case['mix']:>8} B={case['batch']:<4} ideal {case['ideal_speedup']:5.2f}"]
        for name, entry in case["backends"].items():
            if "efficiency" in entry:
                parts.append(f"{name} eff {entry['efficiency']:.2f}")
            if "speedup_vs_dense" in entry:
                parts.append(f"{name} xdense {entry['speedup_vs_dense']:.2f}")
            if "speedup_vs_masked" in entry:
                parts.append(f"{name} xmasked {entry['speedup_vs_masked']:.2f}")
        write("  ".join(parts))
    for name, why in skipped.items():
        write(f"{name} backend not measured: {why}")
    write("targets:")
    for line in bench.format_targets(bench.evaluate_targets(cases, skipped)):
        write(f"  {line}")


def _serve_summary(terminalreporter, benchmarks) -> None:
    """benches/bench_serve.py: the serving targets from each case's median round."""
    from canet.bench.serving import serving_targets

    cases = {}
    for result in benchmarks:
        extra = getattr(result, "extra_info", {}) or {}
        if "case" in extra and result:
            # The median round's throughput; latencies and counters of the last round.
            cases[extra["case"]] = {**extra, "users_per_s": extra["requests"] / result.stats.median}
    if not cases:
        return
    write = terminalreporter.write_line
    terminalreporter.section("canet serve (median rounds)")
    for case, row in cases.items():
        write(f"{case:>10}: {row['users_per_s']:7.0f} users/s  p50 {row['p50_ms']:.1f} ms  "
              f"p99 {row['p99_ms']:.1f} ms  mean batch {row['mean_batch'] or 0:.1f}")
    for name, target in serving_targets(cases).items():
        write(f"  {name} = {target['value']:.2f} ({'met' if target['met'] else 'MISSED'}, "
              f"target {'>=' if target['kind'] == 'min' else '<'} {target['threshold']:g})")
