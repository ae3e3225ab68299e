"""pytest-benchmark suite: users/s of every scoring method for each (mix, batch).

Every method of one (mix, batch) shares the benchmark group ``"{mix}-B{batch}"`` so pytest-
benchmark prints them side by side; the ratios that matter (efficiency, speedup vs dense and
vs masked) are printed after the run by ``benches/conftest.py``. Model, inputs and mixes all come
from :mod:`canet.bench`, the same builders ``canet bench`` uses.

Select a slice with ``-k``, e.g. ``pytest benches/ --benchmark-only -k "paper and B512"``.
"""

from __future__ import annotations

import pytest
import torch

from canet import bench

# Baselines first, then per backend routed and all-largest: the order rows appear in a group.
METHODS: tuple[str, ...] = (
    *bench.BASELINES,
    *(m for b in bench.DEFAULT_BACKENDS for m in (b, f"{b}_largest")),
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", bench.BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mix", bench.MIXES)
def test_score(benchmark, bench_model, bench_engines, mix: str, batch: int, method: str):
    backend = method.removesuffix("_largest")
    if backend in bench.DEFAULT_BACKENDS and backend not in bench_engines:
        _, skipped = bench.available_backends([backend])
        pytest.skip(f"{backend} backend unavailable: {skipped[backend]}")
    space = bench_model.space
    seqs = bench.make_sequences(batch)
    config_ids = bench.make_config_ids(mix, batch, space)
    call = bench.method_calls(bench_model, bench_engines, seqs, config_ids)[method]

    benchmark.group = f"{mix}-B{batch}"
    benchmark.extra_info.update(
        mix=mix,
        batch=batch,
        method=method,
        threads=torch.get_num_threads(),
        flops_routed=bench.routed_flops(config_ids, space, bench.SEQ_LEN, bench.NUM_ITEMS),
        flops_largest=bench.routed_flops(
            torch.full((batch,), space.largest_id), space, bench.SEQ_LEN, bench.NUM_ITEMS
        ),
    )
    with torch.inference_mode():
        call()  # warm-up: first calls pay for allocator growth and lazy initialisation
        benchmark(call)
