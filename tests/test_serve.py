"""Tests for canet.serve and ``canet serve``: results equal to Recommender.recommend, micro-
batching of concurrent requests, every bad input's status and message, backpressure,
readiness, 500s with an error id, metrics, and one end-to-end run through uvicorn with a
graceful SIGTERM. An in-process ASGI client (httpx) drives the app; the batcher runs through
the app's lifespan as under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs the serve extra: pip install 'canet[serve]'")
pytest.importorskip("prometheus_client",
                    reason="needs the serve extra: pip install 'canet[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")

from helpers import cli_fails, train_tiny_run, write_csv_log  # noqa: E402  (tests/ is on sys.path)

from canet.recommender import Recommender  # noqa: E402
from canet.serve import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return train_tiny_run(write_csv_log(root / "log.csv"), root / "run")


@pytest.fixture(scope="module")
def rec(run_dir):
    return Recommender.from_pretrained(run_dir, backend="auto")


@pytest.fixture(scope="module")
def tokens(rec):
    return rec.vocab.item_tokens(range(1, rec.vocab.num_items + 1))


@contextlib.asynccontextmanager
async def serving(app, lifespan: bool = True):
    """An httpx client on ``app``, inside its lifespan (batcher started, warm-up done)."""
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://canet")
        )


def histories_of(tokens, count: int, seed: int) -> list[list[str]]:
    """``count`` histories of 1..12 tokens (longer than max_len 8 for some), deterministic."""
    return [[tokens[(seed * 7 + u * 3 + j * 5) % len(tokens)] for j in range(1 + (u + seed) % 12)]
            for u in range(count)]


def expected(reference: Recommender, histories, k: int, exclude: bool) -> dict:
    """What the service must answer, from one plain Recommender.recommend call."""
    with pytest.warns(UserWarning) if _has_unknown(reference, histories) else \
            contextlib.nullcontext():
        ranked = reference.recommend(histories, k=k, exclude_history=exclude)
    keys = list(histories) if isinstance(histories, dict) else range(len(histories))
    results = {
        key: {"items": [i for i, _ in ranked[key]], "scores": [s for _, s in ranked[key]],
              "config": reference.last_config_ids[key],
              "unknown_items": reference.last_unknown.get(key, [])}
        for key in keys
    }
    return {"results": results if isinstance(histories, dict) else list(results.values()),
            "flops_fraction": reference.last_flops_fraction}


def _has_unknown(reference, histories) -> bool:
    values = histories.values() if isinstance(histories, dict) else histories
    return any(len(reference.vocab.item_ids(h)[1]) for h in values)


def test_responses_equal_recommender_recommend(rec, tokens) -> None:
    # Requests one after the other: each forms its own batches of at most 4 users, exactly
    # as a Recommender with batch_size 4 runs them, so the answer is bit for bit its answer.
    app = create_app(rec, max_batch_size=4, max_wait_ms=0)
    reference = Recommender(rec.model, rec.vocab, backend=rec.backend, batch_size=4)
    n = rec.vocab.num_items
    cases = [
        (histories_of(tokens, 1, 0), 3, True),
        (histories_of(tokens, 3, 1) + [["nope", tokens[2], "nada"]], 5, False),
        ({"alice": [tokens[0], tokens[1]], "bob": ["x", tokens[5]], "carol": tokens[:9]}, n,
         True),
        (histories_of(tokens, 11, 2), 2, True),  # split across 3 batches, reassembled
        (histories_of(tokens, 6, 3), 7, False),
    ]

    async def main():
        async with serving(app) as client:
            for histories, k, exclude in cases:
                response = await client.post("/v1/recommend", json={
                    "histories": histories, "k": k, "exclude_history": exclude})
                assert response.status_code == 200, response.text
                assert response.json() == expected(reference, histories, k, exclude)
            # The defaults: k 10, exclude_history true.
            response = await client.post("/v1/recommend", json={"histories": cases[0][0]})
            assert response.json() == expected(reference, cases[0][0], 10, True)

    asyncio.run(main())
    answer = expected(reference, cases[2][0], n, True)["results"]
    assert answer["bob"]["unknown_items"] == ["x"]
    assert not {"alice", "bob"} & set(answer["alice"]["items"])  # history excluded


def test_concurrent_requests_are_batched(rec, tokens) -> None:
    app = create_app(rec, max_batch_size=64, max_wait_ms=200)
    service = app.state.service
    seen: list[list] = []
    run_batch = service.batcher.run_batch

    def recording(batch):  # the histories of every batch, in batch order
        seen.append([h for job, first, end in batch for h in job.histories[first:end]])
        return run_batch(batch)

    service.batcher.run_batch = recording
    requests = [histories_of(tokens, 1 + i % 3, seed=i) for i in range(20)]
    ks = [2 + i % 4 for i in range(20)]

    async def main():
        async with serving(app) as client:
            return await asyncio.gather(*[
                client.post("/v1/recommend", json={"histories": h, "k": k})
                for h, k in zip(requests, ks, strict=True)
            ])

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert 1 <= service.batcher.batches < len(requests)
    assert service.batcher.batches == len(seen)
    # Every request got its own users' answers: those of one Recommender.recommend call on the
    # batch they ran in (bit for bit), cut to the request's k.
    by_history = {}
    for batch in seen:
        ranked = rec.recommend(batch, k=max(ks))
        for row, history in enumerate(batch):
            by_history[json.dumps(history)] = (ranked[row], rec.last_config_ids[row])
    for histories, k, response in zip(requests, ks, responses, strict=True):
        results = response.json()["results"]
        assert len(results) == len(histories)
        for history, result in zip(histories, results, strict=True):
            ranked, config = by_history[json.dumps(history)]
            assert result["items"] == [i for i, _ in ranked[:k]]
            assert result["scores"] == [s for _, s in ranked[:k]]
            assert result["config"] == config


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"\xff\xfe", 400, "the body is not valid JSON"),
        (b"[" * 3000, 400, "the body is not valid JSON"),
        (b'{"histories": [[' + b"9" * 5000 + b"]]}", 400, "the body is not valid JSON"),
        (b"[1, 2]", 400, 'the body must be a JSON object with "histories", got a list'),
        ({}, 422, '"histories" is required'),
        ({"histories": [["i1"]], "K": 3}, 422, "unknown key(s) 'K'; expected"),
        ({"histories": "i1"}, 422, '"histories" must be a list of item-token lists or an '
         "object user -> list, got a string"),
        ({"histories": []}, 422, '"histories" holds no user'),
        ({"histories": [["T0"]] * 9}, 422,
         '"histories" holds 9 users, more than the limit of 8 per request'),
        ({"histories": [["T0"]], "k": 0}, 422, '"k" must be an integer in [1, 20]'),
        ({"histories": [["T0"]], "k": 21}, 422, '"k" must be an integer in [1, 20] (the '
         "catalogue size), got 21"),
        ({"histories": [["T0"]], "k": "10"}, 422, 'got "10"'),
        ({"histories": [["T0"]], "k": 2.5}, 422, '"k" must be an integer'),
        ({"histories": [["T0"]], "k": True}, 422, '"k" must be an integer'),
        ({"histories": [["T0"]], "exclude_history": "yes"}, 422,
         '"exclude_history" must be true or false, got "yes"'),
        ({"histories": [["T0"], "oops"]}, 422,
         'history 1 must be a list of item tokens (strings or integers), got "oops"'),
        ({"histories": [[1.5]]}, 422, "history 0 must be a list of item tokens"),
        ({"histories": [["T0"], ["x", "y"]]}, 422,
         "history 1 has no item known to the model (2 token(s), unknown: ['x', 'y'])"),
        ({"histories": {"bob": []}}, 422, 'user "bob" has no item known to the model'),
        ({"histories": [["T0"]], "budget": "low"}, 422,
         '"budget" must be a number in (0, 1] or null, got "low"'),
        ({"histories": [["T0"]], "budget": 0}, 422, "budget must be a number in (0, 1]"),
        ({"histories": [["T0"]], "budget": 1.5}, 422, "budget must be a number in (0, 1]"),
        ({"histories": [["T0"]], "budget": 0.01}, 422,
         "budget 0.01 is below the cheapest sub-network's cost"),
        ({"histories": [["x" * 9000]]}, 413, "the request body is larger than the limit of "
         "8000 bytes"),
    ],
)
def test_bad_inputs_get_their_status_and_message(rec, tokens, body, status, message) -> None:
    app = create_app(rec, max_request_users=8, max_body_bytes=8000, warmup=False)
    if isinstance(body, dict):  # "T<i>": the i-th known token
        body = re.sub(r'"T(\d)"', lambda m: json.dumps(tokens[int(m.group(1))]),
                      json.dumps(body)).encode()

    async def main():
        async with serving(app) as client:
            return await client.post("/v1/recommend", content=body)

    response = asyncio.run(main())
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.json()


def test_a_streamed_body_over_the_limit_is_413(rec, tokens) -> None:
    # No Content-Length (chunked): the limit is enforced while reading.
    app = create_app(rec, max_body_bytes=1000, warmup=False)

    async def chunks():
        yield b'{"histories": [['
        for _ in range(300):  # about 1800 bytes
            yield json.dumps(tokens[0]).encode() + b", "
        yield json.dumps(tokens[0]).encode() + b"]]}"

    async def main():
        async with serving(app) as client:
            return await client.post("/v1/recommend", content=chunks())

    response = asyncio.run(main())
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]


def test_budget_per_request(rec, run_dir, tokens) -> None:
    app = create_app(rec, max_batch_size=8, max_wait_ms=0, warmup=False)
    histories = histories_of(tokens, 8, 4)
    budgeted = Recommender(rec.model, rec.vocab, backend=rec.backend, budget=0.2)

    async def main():
        async with serving(app) as client:
            low = await client.post("/v1/recommend", json={"histories": histories,
                                                           "budget": 0.2})
            plain = await client.post("/v1/recommend", json={"histories": histories})
            again = await client.post("/v1/recommend", json={"histories": histories,
                                                             "budget": 0.2})
            return low.json(), plain.json(), again.json()

    low, plain, again = asyncio.run(main())
    assert low == again == expected(budgeted, histories, 10, True)
    assert plain == expected(rec, histories, 10, True)
    assert low["flops_fraction"] <= plain["flops_fraction"]
    assert list(app.state.service._engines) == [0.2]  # one engine per budget, reused

    # A model without a calibration table: budgets below 1 are refused with the
    # Recommender's own message, 1.0 (the router's routing) is served.
    model = copy.deepcopy(rec.model)
    model.budget_table = None
    app = create_app(Recommender(model, rec.vocab, backend=rec.backend), warmup=False)

    async def uncalibrated():
        async with serving(app) as client:
            refused = await client.post("/v1/recommend", json={"histories": histories,
                                                               "budget": 0.5})
            served = await client.post("/v1/recommend", json={"histories": histories,
                                                              "budget": 1})
            return refused, served

    refused, served = asyncio.run(uncalibrated())
    assert refused.status_code == 422
    assert "budget 0.5 needs a calibration table" in refused.json()["error"]
    assert served.status_code == 200 and served.json() == plain


def test_queue_full_is_503_with_retry_after(rec, tokens) -> None:
    app = create_app(rec, max_batch_size=2, max_wait_ms=0, max_queue=4, max_request_users=4,
                     warmup=False)
    batcher = app.state.service.batcher
    entered, gate = threading.Event(), threading.Event()
    run_batch = batcher.run_batch

    def paused(batch):  # the inference thread holds its batch until the gate opens
        entered.set()
        assert gate.wait(30)
        return run_batch(batch)

    batcher.run_batch = paused

    async def until(condition):
        for _ in range(10000):
            if condition():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("condition never held")

    async def main():
        async with serving(app) as client:
            post = client.post
            first = asyncio.create_task(post("/v1/recommend",
                                             json={"histories": histories_of(tokens, 2, 0)}))
            await until(entered.is_set)  # in the inference thread, no longer waiting
            second = asyncio.create_task(post("/v1/recommend",
                                              json={"histories": histories_of(tokens, 4, 1)}))
            await until(lambda: batcher.waiting_users == 4)
            refused = await post("/v1/recommend", json={"histories": histories_of(tokens, 1, 2)})
            metrics = (await client.get("/metrics")).text
            gate.set()
            return refused, await first, await second, metrics

    try:
        refused, first, second, metrics = asyncio.run(main())
    finally:
        gate.set()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == ("too many users waiting (4 queued, this request adds "
                                       "1, the limit is 4); retry later")
    assert "canet_queue_users 4.0" in metrics
    assert first.status_code == second.status_code == 200
    assert len(second.json()["results"]) == 4 and batcher.waiting_users == 0


def test_users_who_waited_behind_a_busy_thread_do_not_wait_max_wait_again(rec, tokens) -> None:
    # max_wait 10 s: a request arriving at an idle server waits for company (here: until a
    # second request fills the batch); one arriving while a batch runs goes as soon as the
    # thread is free, not 10 s later.
    app = create_app(rec, max_batch_size=2, max_wait_ms=10_000, warmup=False)
    batcher = app.state.service.batcher
    entered, gate = threading.Event(), threading.Event()
    run_batch = batcher.run_batch
    sizes: list[int] = []

    def paused(batch):
        sizes.append(sum(end - first for _, first, end in batch))
        if len(sizes) == 1:
            entered.set()
            assert gate.wait(30)
        return run_batch(batch)

    batcher.run_batch = paused

    async def main():
        async with serving(app) as client:
            post = client.post
            body = {"histories": histories_of(tokens, 1, 0)}
            first = asyncio.create_task(post("/v1/recommend", json=body))
            await asyncio.sleep(0.2)
            assert not entered.is_set()  # idle server: the lone user waits for company
            second = asyncio.create_task(post("/v1/recommend", json=body))
            for _ in range(3000):
                if entered.is_set():
                    break
                await asyncio.sleep(0.001)
            assert entered.is_set()  # the batch filled (2 users) and runs
            third = asyncio.create_task(post("/v1/recommend", json=body))
            await asyncio.sleep(0.05)  # queued behind the running batch
            started = time.perf_counter()
            gate.set()
            answers = await asyncio.gather(first, second, third)
            return answers, time.perf_counter() - started

    try:
        answers, seconds = asyncio.run(main())
    finally:
        gate.set()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert sizes == [2, 1]
    assert seconds < 5  # not the 10 s max_wait


def test_readyz_is_false_until_the_warm_up_is_done(rec, tokens) -> None:
    app = create_app(rec)
    service = app.state.service
    warm_up, gate = service._warm_up, threading.Event()

    def slow_warm_up():
        assert gate.wait(30)
        warm_up()

    service._warm_up = slow_warm_up

    async def main():
        async with serving(app, lifespan=False) as client:
            assert (await client.get("/healthz")).status_code == 200
            before = await client.get("/readyz")
            early = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            lifespan = app.router.lifespan_context(app)
            starting = asyncio.create_task(lifespan.__aenter__())
            await asyncio.sleep(0.05)
            during = await client.get("/readyz")
            gate.set()
            await starting
            after = await client.get("/readyz")
            served = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            await lifespan.__aexit__(None, None, None)
            stopped = await client.get("/readyz")
            return before, early, during, after, served, stopped

    try:
        before, early, during, after, served, stopped = asyncio.run(main())
    finally:
        gate.set()
    assert before.status_code == 503 and before.json() == {"ready": False}
    assert early.status_code == 503 and "not ready" in early.json()["error"]
    assert early.headers["retry-after"] == "1"
    assert during.status_code == 503 and after.status_code == 200
    assert after.json() == {"ready": True} and served.status_code == 200
    assert stopped.status_code == 503


def test_an_error_in_the_model_is_a_500_with_a_logged_error_id(rec, tokens, caplog) -> None:
    app = create_app(rec, warmup=False)
    batcher = app.state.service.batcher
    run_batch = batcher.run_batch

    def broken(batch):
        raise RuntimeError("the engine broke")

    async def main():
        async with serving(app) as client:
            batcher.run_batch = broken
            failed = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            batcher.run_batch = run_batch
            fine = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            return failed, fine

    with caplog.at_level(logging.INFO, logger="canet.serve"):
        failed, fine = asyncio.run(main())
    assert failed.status_code == 500 and fine.status_code == 200
    error_id = failed.json()["error_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", error_id) and error_id in failed.json()["error"]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info and "the engine broke" in str(logged[0].exc_info[1])
    lines = [r.getMessage() for r in caplog.records if r.name == "canet.serve"]
    assert any(re.fullmatch(r"POST /v1/recommend 500 users=0 [\d.]+ms", m) for m in lines)
    assert any(re.fullmatch(r"POST /v1/recommend 200 users=1 [\d.]+ms", m) for m in lines)


def test_model_info_and_metrics(rec, tokens) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(rec, max_batch_size=4, max_wait_ms=0)
    other = create_app(rec)  # a second app: its own registry, no collision

    async def main():
        async with serving(app) as client:
            info = (await client.get("/v1/model")).json()
            for seed in range(3):
                await client.post("/v1/recommend",
                                  json={"histories": histories_of(tokens, 3, seed)})
            await client.post("/v1/recommend", json={"histories": [], "k": 2})
            metrics = await client.get("/metrics")
        async with serving(other) as client:
            other_metrics = (await client.get("/metrics")).text
        return info, metrics, other_metrics

    info, metrics, other_metrics = asyncio.run(main())
    assert info["num_items"] == rec.vocab.num_items and info["backend"] == rec.backend
    assert info["canet_version"] == __import__("canet").__version__
    assert info["architecture"] == rec.model.arch
    assert len(info["routing_space"]["configs"]) == len(rec.model.space)
    assert info["calibration"]["points"][0]["budget"] == 0.2
    assert info["limits"]["max_batch_size"] == 4

    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("canet_requests_total",
                    (("path", "/v1/recommend"), ("status", "200")))] == 3
    assert samples[("canet_requests_total",
                    (("path", "/v1/recommend"), ("status", "422")))] == 1
    assert samples[("canet_request_duration_seconds_count", (("path", "/v1/recommend"),))] == 4
    assert samples[("canet_batch_users_count", ())] == 3
    assert samples[("canet_batch_users_sum", ())] == 9
    assert samples[("canet_served_users_total", ())] == 9
    routed = {dict(labels)["config"]: value for (name, labels), value in samples.items()
              if name == "canet_routed_users_total"}
    assert sum(routed.values()) == 9 and len(routed) == len(rec.model.space)
    fractions = rec.model.flops_fractions
    assert samples[("canet_served_flops_fraction_total", ())] == pytest.approx(
        sum(fractions[int(c)] * n for c, n in routed.items()))
    assert samples[("canet_queue_users", ())] == 0 and samples[("canet_ready", ())] == 1
    assert "/v1/recommend" not in other_metrics


def test_create_app_checks_its_arguments(rec) -> None:
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        create_app(rec, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms must be a finite number >= 0"):
        create_app(rec, max_wait_ms=-1)
    with pytest.raises(ValueError, match="must not exceed max_queue"):
        create_app(rec, max_queue=10, max_request_users=11)
    with pytest.raises(ValueError, match="needs a canet.Recommender"):
        create_app(rec.engine)


def test_serve_without_the_extra_names_the_package(run_dir, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    message = cli_fails(capsys, ["serve", str(run_dir)])
    assert message == ("canet: error: canet serve needs the package 'uvicorn', which is not "
                       "installed: pip install 'canet[serve]'")


def test_serve_refuses_a_bad_shutdown_timeout(run_dir, capsys) -> None:
    assert cli_fails(capsys, ["serve", str(run_dir), "--shutdown-timeout", "-1"]) == (
        "canet: error: --shutdown-timeout must be a finite number of seconds >= 0, got -1")


def test_run_server_passes_the_shutdown_timeout_to_uvicorn(rec, monkeypatch) -> None:
    import uvicorn

    from canet.serve import bind, run_server

    seen = []

    def run(self, sockets=None):  # records what uvicorn would run with, serves nothing
        seen.append(self.config.timeout_graceful_shutdown)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    app = create_app(rec, warmup=False)
    assert run_server(app, bind("127.0.0.1", 0), "warning", shutdown_timeout=2.5) is False
    assert run_server(app, bind("127.0.0.1", 0), "warning") is False
    assert seen == [2.5, None]


def test_serve_refuses_a_bad_port(run_dir, capsys) -> None:
    assert "--port must be in [0, 65535]" in cli_fails(
        capsys, ["serve", str(run_dir), "--port", "70000", "--no-request-log"])


def _read_line(stream, timeout: float) -> str:
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no line from the server within {timeout} s"
    return found[0]


def test_end_to_end_through_uvicorn_with_a_graceful_sigterm(run_dir, rec, tokens,
                                                            tmp_path) -> None:
    # A request waits in the queue (max wait 2 s, batch not full) when SIGTERM comes: uvicorn
    # stops accepting, the request is still answered, and the command exits 0.
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "canet", "serve", str(run_dir), "--port", "0",
             "--max-wait-ms", "2000", "--max-batch-size", "64"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
    try:
        line = _read_line(server.stdout, 120)
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        base = match.group(1)
        deadline = time.monotonic() + 60
        while True:  # the warm-up runs before /readyz says ready
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        history = [tokens[1], tokens[4], "unknown-item"]
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(httpx.post(
            f"{base}/v1/recommend", json={"histories": {"u": history}, "k": 4}, timeout=60)))
        request.start()
        while "canet_queue_users 1.0" not in httpx.get(f"{base}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        request.join(60)
        assert server.wait(60) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert answer and answer[0].status_code == 200, log.read_text()
    assert answer[0].json() == expected(rec, {"u": history}, 4, True)
    text = log.read_text()
    assert re.search(r"POST /v1/recommend 200 users=1 [\d.]+ms", text), text
    assert "Traceback" not in text


def test_a_failing_batcher_answers_500_then_503(rec, tokens, caplog) -> None:
    # A bug in the collector itself must not leave requests waiting forever.
    app = create_app(rec, warmup=False)
    batcher = app.state.service.batcher

    def broken(key):
        raise RuntimeError("collector bug")

    batcher._take = broken

    async def main():
        async with serving(app) as client:
            failed = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            refused = await client.post("/v1/recommend", json={"histories": [[tokens[0]]]})
            return failed, refused, await client.get("/readyz")

    with caplog.at_level(logging.ERROR, logger="canet.serve"):
        failed, refused, not_ready = asyncio.run(main())
    assert failed.status_code == 500 and "error_id" in failed.json()
    assert refused.status_code == 503 and "the batcher failed" in refused.json()["error"]
    assert not_ready.status_code == 503
    messages = [r.getMessage() for r in caplog.records]
    assert any("the batcher failed" in m for m in messages)
