"""pytest-benchmark suite of ``canet serve``: users/s of the HTTP service under a closed-loop
load, per case of :data:`canet.bench.serving.SERVE_CASES` (micro-batching on, off, and on with
every user forced to the largest config), side by side in the group ``"serve"``.

Each case runs one server (a fresh interpreter: :func:`canet.bench.serving.start_server`, the
benchmark model with its router fitted to the paper mix) for the whole module; a round is one
measured phase of ``REQUESTS`` single-user requests from ``CLIENTS`` connections after a
warm-up phase. The ratios of the targets (batching speedup, p99/p50, routing efficiency) are
printed after the run by ``benches/conftest.py``, from the median rounds. ``canet bench
--serve`` is the same measurement as a command.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'canet[serve]'")

from canet.bench import serving  # noqa: E402

CLIENTS = 64
REQUESTS = 1000


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Servers started on first use, one per case, stopped at the module's end."""
    started: dict[str, serving.Server] = {}
    folder = tmp_path_factory.mktemp("serve")

    def get(case: str) -> serving.Server:
        if case not in started:
            spec = serving.server_spec(case, threads=torch.get_num_threads())
            started[case] = serving.start_server(spec, folder / f"{case}.log")
        return started[case]

    yield get
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("case", serving.SERVE_CASES)
def test_serve(benchmark, servers, case: str):
    server = servers(case)
    bodies = serving.request_bodies(256, serving.NUM_ITEMS, serving.SEQ_LEN,
                                    serving.DEFAULT_SEED)
    serving.drive(server.port, bodies, CLIENTS, 2 * CLIENTS, 0, 120.0)  # warm-up
    rounds: list[tuple[serving.LoadResult, dict[str, float]]] = []

    def phase():
        rounds.append(serving.drive(server.port, bodies, CLIENTS, REQUESTS, 0, 300.0))

    benchmark.group = "serve"
    benchmark.pedantic(phase, rounds=3, iterations=1)
    load, counters = rounds[-1]
    assert not load.errors, load.errors[:3]
    benchmark.extra_info.update(serving.case_row(load, counters, server.backend,
                                                 serving.server_spec(case)["max_batch_size"]))
    benchmark.extra_info.update(case=case, clients=CLIENTS, requests=REQUESTS,
                                threads=torch.get_num_threads())
