"""``canet bench --serve``: a closed-loop load test of ``canet serve`` on 127.0.0.1.

Each case starts a server in a fresh interpreter (:func:`serve_main`: the benchmark model of
:mod:`canet.bench.workload`, its router steered to the ``paper`` mix by
:func:`~canet.bench.workload.route_like`, served by :func:`canet.serve.create_app` on uvicorn,
port chosen by the OS) and drives it with ``clients`` concurrent connections, each sending one
single-user request and waiting for its answer before the next (closed loop), for a fixed number
of requests after a warm-up phase, every phase bounded in time. The servers of the cases run
side by side and their measured requests go in interleaved rounds (:func:`measure_serving`).
Cases:

* ``batched``   -- micro-batching on (``max_batch_size`` users, ``max_wait_ms``), the router
  decides;
* ``unbatched`` -- the same server with ``max_batch_size = 1``;
* ``largest``   -- micro-batching on, every user forced to the largest config (what serving
  without routing costs).

Reported per case: throughput (users/s over the measured phase), p50/p99 request latency as the
client sees it, the mean batch size and the mean FLOPs fraction served (both from the server's
``/metrics``, differences over the measured phase). The client is a minimal HTTP/1.1
keep-alive client on asyncio streams: a general client (httpx) costs several times more CPU
per request, and client and server share this machine's cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .report import last_line
from .workload import (
    DEFAULT_SEED,
    NUM_ITEMS,
    SEQ_LEN,
    build_model,
    make_sequences,
    paper_weights,
    route_like,
)

__all__ = [
    "DEFAULT_SEED",
    "NUM_ITEMS",
    "SEQ_LEN",
    "SERVE_CASES",
    "SERVE_TARGETS",
    "LoadResult",
    "Server",
    "case_row",
    "request_bodies",
    "serving_targets",
    "measure_serving",
    "serve_main",
    "server_spec",
    "serving_markdown",
    "start_server",
    "drive",
]

SERVE_CASES: tuple[str, ...] = ("batched", "unbatched", "largest")
# name -> (description, threshold, "min" | "max") of the targets.
SERVE_TARGETS: dict[str, tuple[str, float, str]] = {
    "batching_speedup": ("throughput with micro-batching / with max_batch_size 1", 5.0, "min"),
    "p99_over_p50": ("p99 / p50 latency with micro-batching", 5.0, "max"),
    "routing_efficiency": (
        "(routed / forced-largest throughput) / FLOPs-ideal speedup of the served mix", 0.8,
        "min"),
}
START_TIMEOUT_S = 120.0  # interpreter start, model build, router fit and warm-up batch


# -- the server (a child interpreter) --------------------------------------------------------
def server_spec(
    case: str,
    *,
    num_items: int = NUM_ITEMS,
    seq_len: int = SEQ_LEN,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
    backend: str = "auto",
    max_batch_size: int = 256,
    max_wait_ms: float = 5.0,
    max_queue: int = 4096,
) -> dict[str, Any]:
    """What :func:`serve_main` builds for ``case`` (one of :data:`SERVE_CASES`): ``unbatched``
    serves with max_batch_size 1, ``largest`` forces every user to the largest config."""
    if case not in SERVE_CASES:
        raise ValueError(f"unknown serving case {case!r}; expected one of {SERVE_CASES}")
    return {"num_items": num_items, "seq_len": seq_len, "seed": seed, "threads": threads,
            "backend": backend, "max_batch_size": 1 if case == "unbatched" else max_batch_size,
            "max_wait_ms": max_wait_ms, "max_queue": max_queue, "largest": case == "largest"}


def serve_main(spec_json: str) -> None:
    """Entry point of the server process (``python -c``): build the model from ``spec``, print
    ``port N`` on stdout once listening, serve until SIGTERM."""
    spec = json.loads(spec_json)
    from ..data import Vocab
    from ..recommender import Recommender
    from ..serve import bind, create_app, run_server

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = build_model(spec["num_items"], spec["seq_len"], seed=spec["seed"])
    route_like(model, paper_weights(model.space, spec["seq_len"], spec["num_items"]),
               seed=spec["seed"])
    vocab = Vocab(["u"], [str(i) for i in range(1, spec["num_items"] + 1)])
    fixed = model.space.largest_id if spec["largest"] else None
    recommender = Recommender(model, vocab, backend=spec["backend"], fixed_config_id=fixed,
                              batch_size=max(512, spec["max_batch_size"]))
    app = create_app(recommender, max_batch_size=spec["max_batch_size"],
                     max_wait_ms=spec["max_wait_ms"], max_queue=spec["max_queue"],
                     max_request_users=min(1024, spec["max_queue"]), log_requests=False)
    sock = bind("127.0.0.1", 0)
    print(f"port {sock.getsockname()[1]} backend {recommender.backend}", flush=True)
    run_server(app, sock, "warning")


class Server:
    """A running :func:`serve_main` process: ``port``, ``backend``; :meth:`stop` ends it."""

    def __init__(self, process: subprocess.Popen, port: int, backend: str, log: Path) -> None:
        self.process, self.port, self.backend, self.log = process, port, backend, log

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


def start_server(spec: dict[str, Any], log: Path, timeout_s: float = START_TIMEOUT_S) -> Server:
    """Start :func:`serve_main` with ``spec`` (stderr to ``log``) and wait, at most
    ``timeout_s``, for its port; RuntimeError with the log's last line when it fails."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding this canet
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    code = "import sys; from canet.bench.serving import serve_main; serve_main(sys.argv[1])"
    with open(log, "wb") as errors:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=errors)
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if process.poll() is not None or left <= 0:
            process.kill()
            process.wait()
            why = "did not start" if left > 0 else f"did not listen within {timeout_s:.0f} s"
            raise RuntimeError(f"the benchmark server {why}: {last_line(log)}")
        if select.select([process.stdout], [], [], min(left, 0.2))[0]:
            chunk = os.read(process.stdout.fileno(), 256)
            line += chunk
    _, port, _, backend = line.decode().split()
    server = Server(process, int(port), backend, log)
    try:  # uvicorn listens once the app's start-up (the warm-up batch) is done
        asyncio.run(_wait_ready(server, deadline))
    except BaseException:
        server.stop()
        raise
    return server


async def _wait_ready(server: Server, deadline: float) -> None:
    while True:
        if server.process.poll() is not None:
            raise RuntimeError("the benchmark server stopped during its start-up: "
                               f"{last_line(server.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not become ready in time")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            status, _ = await _request(reader, writer, _head("GET", "/readyz", server.port), b"")
        finally:
            writer.close()
        if status == 200:
            return
        await asyncio.sleep(0.1)


# -- the client ------------------------------------------------------------------------------
class LoadResult:
    """Latencies (s) of the measured requests, the phase's wall time, and the errors."""

    def __init__(self, latencies: list[float], seconds: float, errors: list[str]) -> None:
        self.latencies, self.seconds, self.errors = latencies, seconds, errors

    def extend(self, other: LoadResult) -> None:
        """Pool ``other`` (a later phase against the same server) into this one."""
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.errors += other.errors

    @property
    def users_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies, nearest rank."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _request(reader, writer, head: bytes, body: bytes) -> tuple[int, bytes]:
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    header = await reader.readuntil(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", header)
    if length is None:
        raise RuntimeError(f"response without Content-Length: {header[:200]!r}")
    return status, await reader.readexactly(int(length.group(1)))


def _head(method: str, path: str, port: int) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()


async def _phase(connections, port: int, bodies: list[bytes], requests: int,
                 timeout_s: float) -> LoadResult:
    """Every connection sends requests (bodies in turn) until ``requests`` were sent or
    ``timeout_s`` passed; each waits for its answer before sending the next."""
    head = _head("POST", "/v1/recommend", port)
    sent = 0
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + timeout_s

    async def client(reader, writer) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            begin = time.perf_counter()
            status, answer = await _request(reader, writer, head, body)
            if status == 200:
                latencies.append(time.perf_counter() - begin)
            elif len(errors) < 5:
                errors.append(f"HTTP {status}: {answer[:200].decode(errors='replace')}")
            else:
                errors.append("")

    await asyncio.wait_for(asyncio.gather(*(client(r, w) for r, w in connections)),
                           timeout_s + 30.0)
    return LoadResult(latencies, time.perf_counter() - started, errors)


async def _metrics(port: int) -> dict[str, float]:
    """The server's counters this benchmark reads (batch users sum/count, users, FLOPs)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, text = await _request(reader, writer, _head("GET", "/metrics", port), b"")
    finally:
        writer.close()
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    wanted = ("canet_batch_users_sum", "canet_batch_users_count", "canet_served_users_total",
              "canet_served_flops_fraction_total", "canet_batch_duration_seconds_sum")
    values = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


async def _drive(port: int, bodies: list[bytes], clients: int, requests: int, warmup: int,
                 timeout_s: float) -> tuple[LoadResult, dict[str, float]]:
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    try:
        await _phase(connections, port, bodies, warmup, timeout_s)
        before = await _metrics(port)
        result = await _phase(connections, port, bodies, requests, timeout_s)
        after = await _metrics(port)
    finally:
        for _, writer in connections:
            writer.close()
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return result, delta


def drive(port: int, bodies: list[bytes], clients: int, requests: int, warmup: int,
          timeout_s: float) -> tuple[LoadResult, dict[str, float]]:
    """Closed-loop load on ``127.0.0.1:port``: ``clients`` connections, ``warmup`` requests
    (not measured), then ``requests`` measured ones; each phase stops after ``timeout_s``.
    Returns the measured phase and the server's counter differences over it."""
    return asyncio.run(_drive(port, bodies, clients, requests, warmup, timeout_s))


def request_bodies(count: int, num_items: int, seq_len: int, seed: int, k: int = 10
                   ) -> list[bytes]:
    """``count`` JSON bodies of one user each (seeded full-length histories, item tokens)."""
    seqs = make_sequences(count, num_items, seq_len, seed + 2).tolist()
    return [json.dumps({"histories": [[str(i) for i in seq]], "k": k}).encode()
            for seq in seqs]


# -- the benchmark ---------------------------------------------------------------------------
def measure_serving(
    *,
    clients: int = 64,
    requests: int = 3000,
    warmup: int | None = None,
    threads: int | None = None,
    backend: str = "auto",
    max_batch_size: int = 256,
    max_wait_ms: float = 5.0,
    num_items: int = NUM_ITEMS,
    seq_len: int = SEQ_LEN,
    seed: int = DEFAULT_SEED,
    cases: tuple[str, ...] = SERVE_CASES,
    timeout_s: float = 300.0,
    rounds: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every case of :data:`SERVE_CASES` in ``cases``, one fresh server each; the report.

    The servers run side by side (an idle one costs memory only) and the measured requests
    are sent in ``rounds`` interleaved rounds (case after case, ``requests / rounds`` each,
    pooled per case): the ratios of the targets are then not skewed by the machine getting
    busier or quieter between two cases measured one after the other."""
    warmup = 2 * clients if warmup is None else warmup
    bodies = request_bodies(max(clients * 4, 256), num_items, seq_len, seed)
    shares = [requests // rounds + (i < requests % rounds) for i in range(rounds)]
    results: dict[str, dict[str, Any]] = {}
    servers: dict[str, Server] = {}
    specs = {case: server_spec(case, num_items=num_items, seq_len=seq_len, seed=seed,
                               threads=threads, backend=backend, max_batch_size=max_batch_size,
                               max_wait_ms=max_wait_ms, max_queue=max(4096, clients))
             for case in cases}
    with tempfile.TemporaryDirectory(prefix="canet-bench-serve-") as folder:
        try:
            for case in cases:
                servers[case] = start_server(specs[case], Path(folder) / f"{case}.log")
            for case in cases:
                drive(servers[case].port, bodies, clients, warmup, 0, timeout_s)
            loads = {case: LoadResult([], 0.0, []) for case in cases}
            counters: dict[str, dict[str, float]] = {case: {} for case in cases}
            for share in shares:
                for case in cases:
                    load, delta = drive(servers[case].port, bodies, clients, share, 0,
                                        timeout_s)
                    loads[case].extend(load)
                    for name, value in delta.items():
                        counters[case][name] = counters[case].get(name, 0.0) + value
        finally:
            for server in servers.values():
                server.stop()
    for case in cases:
        load = loads[case]
        if not load.latencies:
            raise RuntimeError(f"{case}: no request succeeded: {load.errors[:1]}")
        results[case] = case_row(load, counters[case], servers[case].backend,
                                 specs[case]["max_batch_size"])
        row = results[case]
        log(f"  {case:<10} {row['users_per_s']:8.0f} users/s  p50 {row['p50_ms']:7.2f} ms  "
            f"p99 {row['p99_ms']:7.2f} ms  mean batch {row['mean_batch'] or 0:6.1f}  "
            f"FLOPs {row['flops_fraction'] or 0:.3f}  inference "
            f"{row['inference_ms_per_user'] or 0:.2f} ms/user  errors {row['errors']}")
    return {
        "settings": {"clients": clients, "requests": requests, "warmup": warmup,
                     "rounds": rounds,
                     "threads": threads or torch.get_num_threads(), "backend": backend,
                     "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                     "num_items": num_items, "seq_len": seq_len, "seed": seed,
                     "mix": "paper (router fitted by canet.bench.route_like)"},
        "cases": results,
        "targets": serving_targets(results),
    }


def case_row(load: LoadResult, counters: dict[str, float], backend: str,
             max_batch_size: int) -> dict[str, Any]:
    """One case's report row from its measured phase and the server's counter differences."""
    batches = counters.get("canet_batch_users_count", 0.0)
    users = counters.get("canet_served_users_total", 0.0)
    return {
        "backend": backend,
        "max_batch_size": max_batch_size,
        "requests": len(load.latencies),
        "errors": len(load.errors),
        "error_examples": [e for e in load.errors if e][:3],
        "seconds": load.seconds,
        "users_per_s": load.users_per_s,
        "p50_ms": 1e3 * load.percentile(0.50),
        "p99_ms": 1e3 * load.percentile(0.99),
        "mean_ms": 1e3 * statistics.fmean(load.latencies),
        "mean_batch": counters.get("canet_batch_users_sum", 0.0) / batches if batches else None,
        "flops_fraction": counters.get("canet_served_flops_fraction_total", 0.0) / users
        if users else None,
        # The inference thread's busy time per user served: the rest of a user's share of the
        # wall time is HTTP, JSON, batching and the client (on the same machine).
        "inference_ms_per_user": 1e3 * counters.get("canet_batch_duration_seconds_sum", 0.0)
        / users if users else None,
    }


def serving_targets(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The targets of :data:`SERVE_TARGETS` that the measured cases allow."""
    values: dict[str, float] = {}
    batched = cases.get("batched")
    if batched and "unbatched" in cases:
        values["batching_speedup"] = batched["users_per_s"] / cases["unbatched"]["users_per_s"]
    if batched:
        values["p99_over_p50"] = batched["p99_ms"] / batched["p50_ms"]
    if batched and "largest" in cases and batched["flops_fraction"]:
        measured = batched["users_per_s"] / cases["largest"]["users_per_s"]
        values["routing_efficiency"] = measured * batched["flops_fraction"]
    out = {}
    for name, value in values.items():
        what, threshold, kind = SERVE_TARGETS[name]
        met = value >= threshold if kind == "min" else value < threshold
        out[name] = {"what": what, "value": value, "threshold": threshold, "kind": kind,
                     "met": met}
    return out


def serving_markdown(report: dict[str, Any], machine: dict[str, Any]) -> str:
    """The report as a Markdown table plus the target verdicts."""
    s = report["settings"]
    lines = [
        f"# canet serve load test ({machine.get('cpu_model', '?')}, {s['threads']} torch "
        f"threads in the server)",
        "",
        f"{s['clients']} closed-loop clients of 1 user each, {s['requests']} measured requests "
        f"per case in {s.get('rounds', 1)} interleaved rounds after {s['warmup']} warm-up ones, "
        f"N={s['num_items']}, L={s['seq_len']}, paper "
        f"routing space, {s['mix']}; batching: max batch {s['max_batch_size']}, max wait "
        f"{s['max_wait_ms']:g} ms.",
        "",
        "| case | backend | users/s | p50 ms | p99 ms | mean batch | FLOPs fraction | "
        "inference ms/user | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in report["cases"].items():
        batch = "-" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}"
        fraction = "-" if row["flops_fraction"] is None else f"{row['flops_fraction']:.3f}"
        busy = ("-" if row["inference_ms_per_user"] is None
                else f"{row['inference_ms_per_user']:.2f}")
        lines.append(f"| {case} | {row['backend']} | {row['users_per_s']:.0f} | "
                     f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {batch} | {fraction} | "
                     f"{busy} | {row['errors']} |")
    lines += ["", "Targets:", ""]
    for name, target in report["targets"].items():
        sign = ">=" if target["kind"] == "min" else "<"
        lines.append(f"- {name}: {target['what']} = {target['value']:.2f} (target {sign} "
                     f"{target['threshold']:g}): {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"
