"""``canet serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--backend auto] [--max-batch-size 256]
[--max-wait-ms 5] [--max-queue 4096] [--budget B] [--shutdown-timeout S]``.

Serves the run's recommendations over HTTP (:func:`canet.serve.create_app`) with uvicorn. The
socket is bound here (``--port 0`` picks a free port) and the line ``canet serve: listening on
http://HOST:PORT`` is printed once it is. SIGTERM or SIGINT: uvicorn stops accepting
connections and waits for the accepted requests (at most ``--shutdown-timeout`` seconds when
given), the batcher runs every queued user, and the command exits 0. Needs the optional extra
``pip install 'canet[serve]'`` (Starlette, uvicorn, prometheus_client); without it the command
fails with one line naming the missing package. uvicorn and Starlette are imported only by
:func:`run` (through :func:`canet.serve.run_server`), so ``canet --help`` never needs them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from ..errors import CanetError
from .common import add_budget_arguments, budget_options

__all__ = ["add_arguments", "run"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (uses best/) or a checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port (default 8000; 0 picks a free one, printed at start)")
    parser.add_argument("--backend", default="auto",
                        help="canet.Engine backend: auto (the default), torch, cpu, triton")
    parser.add_argument("--device", default="cpu", help="cpu (the default), cuda or cuda:N")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="users per inference batch at most (default 256)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the oldest waiting user waits for a batch to fill "
                        "(default 5)")
    parser.add_argument("--max-queue", type=int, default=4096,
                        help="users waiting at most; past it requests get 503 (default 4096)")
    parser.add_argument("--max-request-users", type=int, default=1024,
                        help="users per request at most (default 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20,
                        help="request body size limit in bytes (default 4 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=None, metavar="S",
                        help="on SIGTERM/SIGINT, wait at most S seconds for open requests, "
                        "then cancel them (default: wait for every accepted request)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="log level (default info: one line per request)")
    parser.add_argument("--no-request-log", action="store_true",
                        help="do not log one line per request")
    add_budget_arguments(parser)


def check_extra() -> None:
    """CanetError naming the first package of the serve extra that is not installed."""
    from ..serve import MISSING_EXTRA_HINT, missing_package

    package = missing_package()
    if package is not None:
        raise CanetError(f"canet serve needs the package {package!r}, which is not installed: "
                         f"{MISSING_EXTRA_HINT}")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"serve: unknown arguments {extra}")
    check_extra()
    if args.shutdown_timeout is not None and not (
        math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0
    ):
        raise CanetError(f"--shutdown-timeout must be a finite number of seconds >= 0, got "
                         f"{args.shutdown_timeout:g}")
    from ..recommender import Recommender
    from ..serve import bind, create_app, run_server

    budget, max_flops = budget_options(args)
    level = getattr(logging, args.log_level.upper())
    log = logging.getLogger("canet.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s canet.serve: "
                                               "%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)

    recommender = Recommender.from_pretrained(
        args.run_dir, backend=args.backend, device=args.device, budget=budget,
        max_flops=max_flops,
    )
    app = create_app(
        recommender, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_request_users=args.max_request_users,
        max_body_bytes=args.max_body_bytes, log_requests=not args.no_request_log,
    )
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"canet serve: listening on http://{shown}:{port} (backend {recommender.backend}, "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms)", flush=True)
    if not run_server(app, sock, args.log_level, args.shutdown_timeout):
        raise CanetError("the server did not start (see the log above)")
    return 0
