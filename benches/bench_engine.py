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

from canet import Engine, bench
from canet.flops import batch_flops, config_flops

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
        flops_routed=batch_flops(bench.config_histogram(config_ids, space), space,
                                 bench.SEQ_LEN, bench.NUM_ITEMS),
        flops_largest=batch * config_flops(space, bench.SEQ_LEN, bench.NUM_ITEMS)[
            space.largest_id
        ],
    )
    with torch.inference_mode():
        call()  # warm-up: first calls pay for allocator growth and lazy initialisation
        benchmark(call)


# -- recommend: fused scoring + top-k against the dense path ---------------------------------
RECOMMEND_ITEMS: tuple[int, ...] = (bench.NUM_ITEMS, 40_000)
RECOMMEND_BATCHES: tuple[int, ...] = (64, 512)


@pytest.fixture(scope="module")
def recommend_engines(bench_model):
    """cpu-backend engines per catalogue size (the 40k model is built once per module)."""
    usable, skipped = bench.available_backends(["cpu"])
    if "cpu" not in usable:
        pytest.skip(f"cpu backend unavailable: {skipped['cpu']}")
    return {
        n: Engine(bench_model if n == bench.NUM_ITEMS else bench.build_model(num_items=n), "cpu")
        for n in RECOMMEND_ITEMS
    }


@pytest.mark.parametrize("path", ["fused", "dense"])
@pytest.mark.parametrize("batch", RECOMMEND_BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("items", RECOMMEND_ITEMS, ids=lambda n: f"N{n}")
def test_recommend(benchmark, recommend_engines, monkeypatch, items: int, batch: int, path: str):
    """``Engine.recommend(k=10)`` on the cpu backend, paper mix, history excluded: ``fused``
    (routed_last_hidden + score_topk, the default) against ``dense`` (scores, scatter, topk)."""
    engine = recommend_engines[items]
    if path == "dense":
        monkeypatch.setattr(engine, "_fused_top_k", lambda *args: False)
    seqs = bench.make_sequences(batch, num_items=items)
    config_ids = bench.make_config_ids("paper", batch, engine.space)
    benchmark.group = f"recommend-N{items}-B{batch}"
    benchmark.extra_info.update(items=items, batch=batch, path=path,
                                threads=torch.get_num_threads())

    def call():
        return engine.recommend(seqs, k=10, config_ids=config_ids)

    call()
    benchmark(call)
