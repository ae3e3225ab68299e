"""HTTP recommendation service: ``create_app(recommender)`` -> a Starlette ASGI app.

    rec = canet.Recommender.from_pretrained("runs/ml100k")
    app = canet.serve.create_app(rec, max_batch_size=256, max_wait_ms=5)
    canet.serve.run_server(app, canet.serve.bind("127.0.0.1", 8000))  # or any ASGI server
    # the same as `canet serve runs/ml100k` (canet.cli.serve)

Concurrent requests are micro-batched: an asyncio collector takes waiting users into a batch
until it holds ``max_batch_size`` users or the oldest waiting user has waited ``max_wait_ms``,
whichever comes first, and hands it to ONE inference thread (torch's own threads do the
parallel work) through :meth:`canet.Recommender.recommend`; a request with more users than fit
is split across batches and reassembled. Users of one batch share the budget, the
``exclude_history`` flag and (for k above the fused top-k limit) k, so every batch is one plain
``Recommender.recommend`` call: items, configs and unknown items are exactly those of an
unbatched call, and scores are bit for bit those of a call on the same batch (the engine's
GEMMs may round the last float bit differently when a user shares a group with other users).

The serving dependencies (Starlette, prometheus_client; uvicorn for the command) are the
optional extra ``pip install 'canet[serve]'``, imported only inside :func:`create_app` and
:func:`run_server`, so ``import canet`` (and ``import canet.serve``) never loads them.
docs/serving.md describes the API, the metrics and the knobs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .budget import BudgetError, check_budget, mean_fraction
from .errors import CanetError
from .ops import SCORE_TOPK_MAX_K
from .recommender import Recommender

__all__ = ["create_app", "bind", "run_server", "missing_package", "Batcher", "ClientError",
           "QueueFull", "MISSING_EXTRA_HINT", "REQUIRED_PACKAGES"]

logger = logging.getLogger("canet.serve")

MISSING_EXTRA_HINT = "pip install 'canet[serve]'"
# The extra "serve" of pyproject.toml: import name -> the name pip installs it by.
REQUIRED_PACKAGES = {"starlette": "starlette", "uvicorn": "uvicorn",
                     "prometheus_client": "prometheus-client"}
# Keys a POST /v1/recommend body may hold (anything else is refused: a typo such as "K" must
# not silently fall back to the default).
REQUEST_KEYS = frozenset({"histories", "k", "exclude_history", "budget"})


class ClientError(Exception):
    """A request the client must fix: ``status`` (400, 413, 422, 503) and a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class QueueFull(ClientError):
    """More users would wait than ``max_queue`` allows (503 with Retry-After)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, {"Retry-After": "1"})


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


# -- the batcher ---------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One accepted request on its way through the batcher: ``histories`` (known tokens per
    user), batched by ``key``, results written per user, ``future`` resolved once all are."""

    histories: list[list[str]]
    k: int
    exclude_history: bool
    recommender: Recommender
    key: tuple
    future: asyncio.Future
    enqueued: float
    taken: int = 0  # users handed to a batch so far
    done: int = 0  # users whose results came back
    results: list[Any] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.histories)


Slice = tuple[Job, int, int]  # (job, first user, end user)


class Batcher:
    """The micro-batcher: an asyncio collector forming batches, one inference thread.

    ``run_batch(slices) -> list of per-user results`` runs in the inference thread with the
    slices of one batch (their jobs share one key); ``on_batch(slices, results, seconds)`` is
    called on the event loop after each successful batch (metrics). ``waiting_users`` counts
    the users accepted but not yet in a batch (the queue depth ``max_queue`` bounds).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Slice]], list[Any]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[list[Slice], list[Any], float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_queue = on_queue
        self.waiting_users = 0
        self.batches = 0  # batches run (warm-up excluded)
        self.closing = False
        self.failed = False  # the collector itself failed (a bug): nothing is served any more
        self._pending: collections.deque[Job] = collections.deque()
        self._in_flight: list[Slice] = []  # the batch taken and not yet delivered
        self._waiting_by_key: collections.Counter = collections.Counter()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # When the inference thread last finished a batch (loop time): users who arrived
        # before it waited behind a busy thread, and their batch starts without more waiting.
        self._free_since = -math.inf
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self.closing

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canet-inference")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function()`` in the inference thread (the warm-up)."""
        assert self._executor is not None, "Batcher.start() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def stop(self) -> None:
        """Stop accepting, run every accepted user's batch, then end the inference thread."""
        self.closing = True
        if self._task is None:
            return
        self._wakeup.set()
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    def submit(self, job: Job) -> None:
        """Queue ``job`` (QueueFull past ``max_queue`` waiting users, 503 when not running)."""
        if not self.running:
            reason = ("the batcher failed (see the server log); restart the server"
                      if self.failed else "the server is shutting down" if self.closing
                      else "the server is not ready yet")
            raise ClientError(503, reason, {"Retry-After": "1"})
        if self.waiting_users + job.size > self.max_queue:
            raise QueueFull(
                f"too many users waiting ({self.waiting_users} queued, this request adds "
                f"{job.size}, the limit is {self.max_queue}); retry later"
            )
        self._pending.append(job)
        self._waiting_by_key[job.key] += job.size
        self._set_waiting(self.waiting_users + job.size)
        self._wakeup.set()

    def _set_waiting(self, value: int) -> None:
        self.waiting_users = value
        if self.on_queue is not None:
            self.on_queue(value)

    async def _collect(self) -> None:
        try:
            await self._batches()
        except Exception as error:  # a bug here must not leave requests waiting forever
            logger.exception("canet.serve: the batcher failed; refusing new requests")
            self.closing = self.failed = True
            failure = RuntimeError(f"the batcher failed: {error!r}")
            for job in [*self._pending, *(job for job, _, _ in self._in_flight)]:
                if not job.future.done():
                    job.future.set_exception(failure)
            self._pending.clear()

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        running: tuple[list[Slice], asyncio.Future, float] | None = None
        while True:
            if running is None:
                batch = await self._next_batch(loop)
                if batch is None:
                    return
                if not batch:
                    continue
                running = self._start(loop, batch)
            batch, future, started = running
            try:
                results = await future
            except Exception as error:  # the model failed: every request of the batch gets it
                for job, _, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                self._in_flight = []
                self._free_since = loop.time()
                running = None
                continue
            seconds = time.perf_counter() - started
            self._free_since = loop.time()
            # Start the next batch before delivering this one when its users are ready to go:
            # the event loop's delivery work (JSON, sockets) then overlaps the next batch's
            # inference instead of leaving the inference thread idle.
            running = None
            self._drop_finished()
            if self._pending and self._ready(self._pending[0], loop):
                taken = self._take(self._pending[0].key)
                if taken:
                    running = self._start(loop, taken)
            self.batches += 1
            if self.on_batch is not None:
                try:
                    self.on_batch(batch, results, seconds)
                except Exception:  # metrics must never lose an answer
                    logger.exception("canet.serve: recording the metrics of a batch failed")
            self._deliver(batch, results)
            if running is None:
                self._in_flight = []

    def _ready(self, head: Job, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether the head's batch goes now: the batch is full, the server is draining, or
        the head arrived while the thread was busy (under load the next batch fills while the
        thread runs the current one; waiting longer would only idle it)."""
        return (self.closing or self._waiting_by_key[head.key] >= self.max_batch_size
                or head.enqueued <= self._free_since)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[Slice] | None:
        """The next batch once it should go (None: closing with nothing left; [] : look
        again). After an idle spell the head waits up to max_wait for company."""
        self._drop_finished()
        if not self._pending:
            if self.closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
            return []
        head = self._pending[0]
        deadline = head.enqueued + self.max_wait
        while not self._ready(head, loop):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take(head.key)

    def _start(self, loop: asyncio.AbstractEventLoop,
               batch: list[Slice]) -> tuple[list[Slice], asyncio.Future, float]:
        """Hand ``batch`` to the inference thread; it is in flight until delivered."""
        self._in_flight = batch
        return batch, loop.run_in_executor(self._executor, self.run_batch, batch), \
            time.perf_counter()

    def _drop_finished(self) -> None:
        # A job whose future is done (an earlier part failed, the client went away) needs no
        # more batches: its remaining users stop counting as waiting.
        while self._pending and self._pending[0].future.done():
            self._forget(self._pending.popleft())

    def _forget(self, job: Job) -> None:
        left = job.size - job.taken
        job.taken = job.size
        self._waiting_by_key[job.key] -= left
        if self._waiting_by_key[job.key] <= 0:
            del self._waiting_by_key[job.key]
        self._set_waiting(self.waiting_users - left)

    def _take(self, key: tuple) -> list[Slice]:
        """Up to ``max_batch_size`` waiting users of ``key``, oldest first."""
        batch: list[Slice] = []
        room = self.max_batch_size
        kept: collections.deque[Job] = collections.deque()
        for job in self._pending:
            if job.future.done():
                self._forget(job)
                continue
            if room and job.key == key:
                count = min(room, job.size - job.taken)
                batch.append((job, job.taken, job.taken + count))
                job.taken += count
                room -= count
                self._waiting_by_key[key] -= count
                self._set_waiting(self.waiting_users - count)
            if job.taken < job.size:
                kept.append(job)
        if self._waiting_by_key.get(key, 1) <= 0:
            del self._waiting_by_key[key]
        self._pending = kept
        return batch

    @staticmethod
    def _deliver(batch: list[Slice], results: list[Any]) -> None:
        position = 0
        for job, first, end in batch:
            count = end - first
            if not job.future.done():
                job.results[first:end] = results[position : position + count]
                job.done += count
                if job.done == job.size:
                    job.future.set_result(job.results)
            position += count


# -- the application -----------------------------------------------------------------------
class _Metrics:
    """The app's Prometheus metrics, in a registry of its own (apps never collide)."""

    def __init__(self, max_batch_size: int, configs: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("canet_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.latency = Histogram(
            "canet_request_duration_seconds", "HTTP request latency", ["path"], registry=r,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
        )
        buckets = sorted({2 ** i for i in range(max(1, max_batch_size).bit_length())}
                         | {max_batch_size})
        self.batch_users = Histogram("canet_batch_users", "users per inference batch",
                                     registry=r, buckets=buckets)
        self.batch_seconds = Histogram(
            "canet_batch_duration_seconds", "inference time per batch", registry=r,
            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
        )
        self.queue = Gauge("canet_queue_users", "users accepted and waiting for a batch",
                           registry=r)
        self.routed = Counter("canet_routed_users", "users served, by routed config id",
                              ["config"], registry=r)
        self.users = Counter("canet_served_users", "users served", registry=r)
        self.flops = Counter(
            "canet_served_flops_fraction",
            "sum over served users of their sub-network's FLOPs as a fraction of the largest's "
            "(divide by canet_served_users_total for the mean)", registry=r,
        )
        self.ready = Gauge("canet_ready", "1 once the model is loaded and warmed up",
                           registry=r)
        for config in range(configs):  # every config is listed, also at 0
            self.routed.labels(config=str(config))

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Service:
    """What the app's endpoints share: the recommenders (one per budget), the batcher, the
    metrics and the readiness flag. ``app.state.service`` holds it."""

    def __init__(
        self,
        recommender: Recommender,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        max_request_users: int,
        max_body_bytes: int,
        max_engines: int,
        warmup: bool,
        log_requests: bool,
    ) -> None:
        self.recommender = recommender
        self.model = recommender.model
        self.vocab = recommender.vocab
        self.num_items = recommender.vocab.num_items
        self.default_budget = recommender.engine.budget
        penalty = recommender.engine.penalty
        self.max_flops = None if penalty is None else penalty.max_flops
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self.max_request_users = max_request_users
        self.max_body_bytes = max_body_bytes
        self.max_engines = max_engines
        self.warmup = warmup
        self.log_requests = log_requests
        self.fractions = self.model.flops_fractions
        self.metrics = _Metrics(max_batch_size, len(self.model.space))
        self.batcher = Batcher(
            self._run_batch, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
            max_queue=max_queue, on_batch=self._on_batch, on_queue=self.metrics.queue.set,
        )
        self._engines: collections.OrderedDict[float, Recommender] = collections.OrderedDict()
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        await self.batcher.start()
        if self.warmup:
            started = time.perf_counter()
            try:
                await self.batcher.call(self._warm_up)
            except BaseException:
                await self.batcher.stop()
                raise
            logger.info("warm-up batch done in %.0f ms (backend %s)",
                        1000 * (time.perf_counter() - started), self.recommender.backend)
        self.ready = True
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        waiting = self.batcher.waiting_users
        if waiting:
            logger.info("shutting down: finishing %d queued user(s)", waiting)
        await self.batcher.stop()

    def _warm_up(self) -> None:
        """One batch of ``max_batch_size`` users (histories of 1..max_len known items) at the
        default k, so the first request pays no first-call allocations."""
        tokens = self.vocab.item_tokens(range(1, self.num_items + 1))
        users = [
            [tokens[(u + j) % len(tokens)] for j in range(1 + u % self.model.max_len)]
            for u in range(self.max_batch_size)
        ]
        self.recommender.recommend(users, k=min(10, self.num_items))

    # -- budgets -------------------------------------------------------------------------
    def recommender_for(self, budget: float | None) -> Recommender:
        """The recommender of ``budget`` (None: the server's default), cached (LRU of
        ``max_engines``); BudgetError as the Recommender raises it."""
        if budget is None or budget == self.default_budget:
            return self.recommender
        found = self._engines.get(budget)
        if found is None:
            # Shares the default recommender's warm backend (weights, packed copies): a new
            # budget costs its penalty vector, not a second model or another warm-up.
            found = self.recommender.with_budget(budget, self.max_flops)
            self._engines[budget] = found
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
        else:
            self._engines.move_to_end(budget)
        return found

    # -- batches (inference thread) --------------------------------------------------------
    def _run_batch(self, batch: list[Slice]) -> list[dict]:
        job = batch[0][0]
        recommender = job.recommender
        histories = [h for job, first, end in batch for h in job.histories[first:end]]
        k = max(job.k for job, _, _ in batch)
        ranked = recommender.recommend(histories, k=k, exclude_history=job.exclude_history)
        configs = recommender.last_config_ids
        out = []
        row = 0
        for job, first, end in batch:
            for _ in range(first, end):
                top = ranked[row][: job.k]
                out.append({"items": [item for item, _ in top],
                            "scores": [score for _, score in top],
                            "config": configs[row]})
                row += 1
        return out

    def _on_batch(self, batch: list[Slice], results: list[dict], seconds: float) -> None:
        metrics = self.metrics
        metrics.batch_users.observe(len(results))
        metrics.batch_seconds.observe(seconds)
        counts = collections.Counter(result["config"] for result in results)
        for config, count in counts.items():
            metrics.routed.labels(config=str(config)).inc(count)
        metrics.users.inc(len(results))
        metrics.flops.inc(sum(self.fractions[c] * n for c, n in counts.items()))

    # -- requests ----------------------------------------------------------------------------
    def parse(self, body: bytes) -> tuple[list[Any] | None, list[list[str]], list[list[str]],
                                          int, bool, Recommender, float | None]:
        """(user keys or None for a list, known tokens per user, unknown tokens per user, k,
        exclude_history, recommender, budget) of a request body; ClientError when invalid."""
        try:
            data = json.loads(body)
        except RecursionError:
            raise ClientError(400, "the body is not valid JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, an int of > 4300 digits
            raise ClientError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ClientError(400, f"the body must be a JSON object with \"histories\", got "
                              f"{_json_type(data)}")
        unknown_keys = sorted(set(data) - REQUEST_KEYS)
        if unknown_keys:
            raise ClientError(422, f"unknown key(s) {', '.join(map(repr, unknown_keys))}; "
                              f"expected {', '.join(sorted(REQUEST_KEYS))}")
        if "histories" not in data:
            raise ClientError(422, "\"histories\" is required: a list of item-token lists "
                              "or an object user -> list")
        histories = data["histories"]
        if isinstance(histories, dict):
            keys: list[Any] | None = list(histories)
            sequences = list(histories.values())
        elif isinstance(histories, list):
            keys, sequences = None, histories
        else:
            raise ClientError(422, "\"histories\" must be a list of item-token lists or an "
                              f"object user -> list, got {_json_type(histories)}")
        if not sequences:
            raise ClientError(422, "\"histories\" holds no user")
        if len(sequences) > self.max_request_users:
            raise ClientError(422, f"\"histories\" holds {len(sequences)} users, more than "
                              f"the limit of {self.max_request_users} per request; split it")
        k = data.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_items:
            raise ClientError(422, f"\"k\" must be an integer in [1, {self.num_items}] (the "
                              f"catalogue size), got {_shown(k, 40)}")
        exclude = data.get("exclude_history", True)
        if not isinstance(exclude, bool):
            raise ClientError(422, f"\"exclude_history\" must be true or false, got "
                              f"{_shown(exclude, 40)}")
        budget = data.get("budget")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise ClientError(422, f"\"budget\" must be a number in (0, 1] or null, got "
                                  f"{_shown(budget, 40)}")
            try:
                budget = check_budget(budget)
            except BudgetError as error:
                raise ClientError(422, str(error)) from None
        try:
            recommender = self.recommender_for(budget)
        except BudgetError as error:  # uncalibrated, below the cheapest config, fixed config
            raise ClientError(422, str(error)) from None
        known, unknown = [], []
        for index, history in enumerate(sequences):
            name = f"user {_shown(keys[index], 60)}" if keys is not None else f"history {index}"
            if not isinstance(history, list) or not all(
                isinstance(t, (str, int)) and not isinstance(t, bool) for t in history
            ):
                raise ClientError(422, f"{name} must be a list of item tokens (strings or "
                                  f"integers), got {_shown(history, 60)}")
            tokens = [str(t) for t in history]
            ids, missing = self.vocab.item_ids(tokens)
            if len(ids) == 0:
                raise ClientError(422, f"{name} has no item known to the model "
                                  f"({len(tokens)} token(s), unknown: {missing[:5]})")
            missing_set = set(missing)
            known.append([t for t in tokens if t not in missing_set])
            unknown.append(missing)
        return keys, known, unknown, k, exclude, recommender, budget

    async def recommend(self, body: bytes) -> tuple[dict, int]:
        keys, known, unknown, k, exclude, recommender, budget = self.parse(body)
        loop = asyncio.get_running_loop()
        # Users of one batch share one Recommender.recommend call: the budget, the exclusion
        # flag and, past the fused top-k limit, k (it picks the code path, so the results).
        # (A budget equal to the server's default runs with the requests that gave none.)
        shared = None if recommender is self.recommender else budget
        key = (shared, exclude, 0 if k <= SCORE_TOPK_MAX_K else k)
        job = Job(known, k, exclude, recommender, key, loop.create_future(), loop.time(),
                  results=[None] * len(known))
        self.batcher.submit(job)
        results = await job.future
        for result, missing in zip(results, unknown, strict=True):
            result["unknown_items"] = missing
        configs = [result["config"] for result in results]
        fraction = mean_fraction(torch.tensor(configs, dtype=torch.int64), self.fractions)
        out = dict(zip(keys, results, strict=True)) if keys is not None else results
        return {"results": out, "flops_fraction": fraction}, len(results)

    def model_info(self) -> dict:
        model, space = self.model, self.model.space
        table = model.budget_table
        return {
            "canet_version": __version__,
            "backend": self.recommender.backend,
            "device": str(self.recommender.engine.device),
            "dtype": str(self.recommender.engine.dtype).removeprefix("torch."),
            "architecture": model.arch,
            "num_items": self.num_items,
            "max_len": model.max_len,
            "routing_space": {
                **space.to_dict(),
                "configs": [
                    {"id": i, "depth": c.depth, "hidden": c.hidden, "emb": c.emb,
                     "flops_fraction": self.fractions[i]}
                    for i, c in enumerate(space.configs)
                ],
            },
            "fixed_config_id": self.recommender.fixed_config_id,
            "budget": self.default_budget,
            "max_flops": self.max_flops,
            "calibration": None if table is None else json.loads(table.to_json()),
            "limits": {
                "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms,
                "max_queue": self.max_queue,
                "max_request_users": self.max_request_users,
                "max_body_bytes": self.max_body_bytes,
            },
        }


# -- running it ---------------------------------------------------------------------------
def missing_package() -> str | None:
    """The pip name of the first package of the serve extra that is not installed, or None."""
    import importlib

    for module, package in REQUIRED_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            return package
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0: a free port); CanetError
    (with the flag names of ``canet serve``) when it cannot be."""
    if not 0 <= port <= 65535:
        raise CanetError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise CanetError(f"--host {host!r}: {error.strerror or error}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise CanetError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket, log_level: str = "info",
               shutdown_timeout: float | None = None) -> bool:
    """Serve ``app`` with uvicorn on the bound ``sock`` until SIGINT/SIGTERM (graceful: uvicorn
    stops accepting and waits for the accepted requests, at most ``shutdown_timeout`` seconds
    when given, after which it cancels those still open; the app's lifespan then drains the
    batcher). Returns whether the server started. The signal that stopped it is absorbed, so
    the caller returns normally (exit 0) after a graceful stop."""
    import uvicorn

    if shutdown_timeout is not None and not (
        isinstance(shutdown_timeout, (int, float)) and math.isfinite(shutdown_timeout)
        and shutdown_timeout >= 0
    ):
        raise CanetError(f"the shutdown timeout must be a finite number >= 0 seconds, got "
                         f"{shutdown_timeout!r}")
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown) and re-raises the signal after it,
    # with the handlers it found installed: these absorb it, so a graceful stop exits 0.
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda number, frame: caught.append(number))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return bool(server.started)


def _shown(value: object, limit: int) -> str:
    """``value`` as JSON, cut to ``limit`` characters (for error messages)."""
    try:
        return json.dumps(value)[:limit]
    except (RecursionError, ValueError):
        return _json_type(value)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def create_app(
    recommender: Recommender,
    *,
    max_batch_size: int = 256,
    max_wait_ms: float = 5.0,
    max_queue: int = 4096,
    max_request_users: int = 1024,
    max_body_bytes: int = 4 << 20,
    max_engines: int = 16,
    warmup: bool = True,
    log_requests: bool = True,
):
    """A Starlette ASGI app serving ``recommender`` (docs/serving.md).

    Args:
        recommender: the :class:`canet.Recommender` (its budget and max_flops are the
            defaults; a request's ``budget`` gets a recommender of its own, sharing the
            weights, cached for ``max_engines`` distinct budgets).
        max_batch_size: users per inference batch at most.
        max_wait_ms: how long the oldest waiting user waits for a batch to fill.
        max_queue: users accepted and waiting at most; past it a request gets 503.
        max_request_users: users per request at most (422 past it); <= max_queue.
        max_body_bytes: request body size limit (413 past it).
        warmup: run a warm-up batch at startup before /readyz says ready.
        log_requests: log one INFO line per request on the ``canet.serve`` logger.

    The batcher starts and stops with the app's lifespan (uvicorn runs it; in tests, enter
    ``app.router.lifespan_context(app)``); ``app.state.service`` is the :class:`Service`.
    """
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ImportError as error:
        raise ImportError(f"canet.serve needs the package {error.name or 'starlette'}: "
                          f"{MISSING_EXTRA_HINT}") from error

    _check_int("max_batch_size", max_batch_size, 1)
    _check_int("max_queue", max_queue, 1)
    _check_int("max_request_users", max_request_users, 1)
    _check_int("max_body_bytes", max_body_bytes, 1)
    _check_int("max_engines", max_engines, 1)
    if max_request_users > max_queue:
        raise ValueError(f"max_request_users ({max_request_users}) must not exceed max_queue "
                         f"({max_queue}): such a request could never be accepted")
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not (
        math.isfinite(max_wait_ms) and max_wait_ms >= 0
    ):
        raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
    if not isinstance(recommender, Recommender):
        raise ValueError(f"create_app needs a canet.Recommender, got "
                         f"{type(recommender).__name__}")

    service = Service(
        recommender, max_batch_size=max_batch_size, max_wait_ms=float(max_wait_ms),
        max_queue=max_queue, max_request_users=max_request_users,
        max_body_bytes=max_body_bytes, max_engines=max_engines, warmup=warmup,
        log_requests=log_requests,
    )
    metrics = service.metrics

    def error_response(status: int, message: str, headers=None, **extra) -> Response:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    def endpoint(handler):
        """Times, logs and counts every request; ClientError -> its status, anything else ->
        500 with an error id that is logged with the traceback."""

        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            path = request.url.path
            users = 0
            try:
                response, users = await handler(request)
            except ClientError as error:
                response = error_response(error.status, error.message, error.headers)
            except Exception:
                error_id = uuid.uuid4().hex[:16]
                logger.exception("error %s in %s %s", error_id, request.method, path)
                response = error_response(
                    500, f"internal error (id {error_id}; the server log has the details)",
                    error_id=error_id,
                )
            seconds = time.perf_counter() - started
            metrics.requests.labels(path=path, status=str(response.status_code)).inc()
            metrics.latency.labels(path=path).observe(seconds)
            if service.log_requests:
                logger.info("%s %s %d users=%d %.1fms", request.method, path,
                            response.status_code, users, 1000 * seconds)
            return response

        return wrapped

    async def read_body(request: Request) -> bytes:
        limit = service.max_body_bytes
        too_large = ClientError(413, f"the request body is larger than the limit of {limit} "
                                "bytes; send fewer users per request")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @endpoint
    async def recommend(request: Request):
        if not service.ready:
            raise ClientError(503, "the server is shutting down" if service.batcher.closing
                              else "the server is not ready yet (warming up)",
                              {"Retry-After": "1"})
        # (a failed batcher is refused by submit, after the body is read)
        body = await read_body(request)
        payload, users = await service.recommend(body)
        return JSONResponse(payload), users

    @endpoint
    async def healthz(request: Request):
        return JSONResponse({"status": "ok"}), 0

    @endpoint
    async def readyz(request: Request):
        ready = service.ready and service.batcher.running
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503), 0

    @endpoint
    async def model_info(request: Request):
        return JSONResponse(service.model_info()), 0

    @endpoint
    async def metrics_text(request: Request):
        body, content_type = metrics.text()
        return Response(body, media_type=content_type), 0

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/v1/recommend", recommend, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/v1/model", model_info, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    return app
