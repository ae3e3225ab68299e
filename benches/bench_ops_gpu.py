"""GPU micro-benchmark of the canet operators against their PyTorch equivalents.

* ``plan`` (B = 4096 users over the 36 configs): the native op eager and replayed from a CUDA
  graph (capture succeeding proves the op never syncs with the host), against the PyTorch
  reference (stable sorts, bincount, cumsum) eager. Target: < 20 us.
* ``score_topk`` (B = 4096, N = 40000, H = 128 with the paper's hidden sizes, L = 50 history
  items excluded, k = 10, bf16): the native op against ``matmul + masked_fill + topk`` on the
  full score matrix and against the matmul alone. Targets: >= 1.5x faster than the former,
  within 2x of the latter.

Writes ``<out>/<date>-<gpu>-ops.json`` and ``.md`` (beside gpu_bench.py's
``<date>-<gpu>.{json,md}``; ``--out`` defaults to ``benches/results``, ``--name`` overrides the
base name) after every measurement, and prints the table last. A measurement that raises is
recorded with its error and the others still run; results that disagree with the PyTorch
reference are recorded with ``correct: false``. The exit status is 1 when anything raised or
disagreed (a missed speed target, ``ok: false``, is reported but is no failure).
``--dry-run`` checks the arguments and builds the inputs on the CPU without timing anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from canet import RoutingSpace, _ext, ops
from canet.bench import (
    DTYPES,
    Interrupted,
    error_text,
    graph_of,
    on_sigterm,
    slug,
    time_repeats,
    write_json_and_markdown,
)

SPACE = RoutingSpace()  # the paper's (default) routing space
HIDDEN_SIZES = SPACE.hidden
CONFIG_TABLE = SPACE.table().tolist()  # (depth, hidden, emb) per config id
MAX_DEPTH = max(depth for depth, _, _ in CONFIG_TABLE)  # given to the op: no host sync
PLAN_TARGET_US = 20.0
TOPK_SPEEDUP_TARGET = 1.5
MATMUL_RATIO_TARGET = 2.0
# score_topk: the op's fp32 top-k scores against the bf16-rounded baseline's, position by
# position (both sorted): bf16 rounding of scores of order 1-5 is < 0.02.
TOPK_MAX_SCORE_DIFF = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan-batch", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--items", type=int, default=40000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--history", type=int, default=50, help="history items excluded per user")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default=None,
                        help="base name of the result files (default <date>-<gpu>-ops)")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and inputs only")
    args = parser.parse_args(argv)
    if args.name is not None and (not args.name or slug(args.name) != args.name):
        parser.error("--name may hold only letters, digits, '.', '_' and '-'")
    for name in ("plan_batch", "batch", "items", "hidden", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.history < 0 or args.warmup < 0:
        parser.error("--history and --warmup must be >= 0")
    if not 1 <= args.k <= min(ops.SCORE_TOPK_MAX_K, args.items):
        parser.error(f"-k must be in [1, {min(ops.SCORE_TOPK_MAX_K, args.items)}]")
    if args.hidden < max(HIDDEN_SIZES):
        parser.error(f"--hidden must be >= {max(HIDDEN_SIZES)} (the largest hidden size)")
    return args


def make_inputs(args: argparse.Namespace, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    table = torch.tensor(CONFIG_TABLE, dtype=torch.int64)
    config_ids = torch.randint(0, len(CONFIG_TABLE), (args.plan_batch,), generator=gen)
    sizes = torch.tensor(HIDDEN_SIZES)[torch.randint(0, 3, (args.batch,), generator=gen)]
    hidden = torch.randn(args.batch, args.hidden, generator=gen)
    weight = torch.randn(args.items + 1, args.hidden, generator=gen) / args.hidden**0.5
    bias = torch.randn(args.items + 1, generator=gen) * 0.1
    history = torch.randint(0, args.items + 1, (args.batch, args.history), generator=gen)
    tensors = {
        "config_ids": config_ids, "table": table, "sizes": sizes, "hidden": hidden.to(dtype),
        "weight": weight.to(dtype), "bias": bias.to(dtype), "history": history,
    }
    return {name: t.to(device) for name, t in tensors.items()}


def time_us(fn, iters: int, warmup: int) -> float:
    """Median microseconds of ``fn()`` over ``iters`` CUDA-event-timed calls."""
    return time_repeats(fn, iters, warmup_calls=warmup, clock="cuda").median * 1e6


def torch_topk(x: dict, k: int):
    """The unfused baseline: per hidden size a sliced matmul into [B, N+1], then mask + topk."""
    scores = torch.empty(x["hidden"].shape[0], x["weight"].shape[0], dtype=x["hidden"].dtype,
                         device=x["hidden"].device)
    for h in HIDDEN_SIZES:
        rows = x[f"rows_{h}"]
        scores[rows] = torch.addmm(x["bias"], x["hidden"][rows, :h], x["weight"][:, :h].T)
    scores[:, 0] = float("-inf")
    scores.scatter_(1, x["history"], float("-inf"))
    return scores.topk(k, dim=1)


def matmul_only(x: dict):
    return torch.addmm(x["bias"], x["hidden"], x["weight"].T)


def bench(args: argparse.Namespace, results: list[dict], on_row=lambda: None) -> None:
    """Append one row per measurement to ``results`` (``on_row`` after each). A measurement
    that raises becomes a row with ``error``; the next one still runs."""

    def row(op, method, us=None, **extra):
        results.append({"op": op, "method": method,
                        "us": None if us is None else round(us, 2), **extra})
        print(json.dumps(results[-1]), flush=True)
        on_row()

    def attempt(op, method, fn):
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            row(op, method, error=error_text(exc))
            return None

    if not _ext.has_kernel("plan", "cuda") or not _ext.has_kernel("score_topk", "cuda"):
        row("build", "canet._C", error=f"canet._C has no CUDA kernels: {_ext.build_info()}")
        return
    x = make_inputs(args, "cuda")
    for h in HIDDEN_SIZES:  # grouping is the engine's job; the baseline gets it for free
        x[f"rows_{h}"] = (x["sizes"] == h).nonzero().squeeze(1)

    def plan_native():
        return torch.ops.canet.plan(x["config_ids"], x["table"], MAX_DEPTH)

    def plan_torch():
        return ops.plan_reference(x["config_ids"], x["table"], check_ids=False)

    def plan_correct():
        p_native, p_ref = ops.Plan(*plan_native()), plan_torch()
        return all(torch.equal(a, b) for a, b in zip(p_native, p_ref, strict=True))

    correct = attempt("plan", "native", plan_correct)
    if correct is not None:
        plan_us = attempt("plan", "native", lambda: time_us(plan_native, args.iters, args.warmup))
        if plan_us is not None:
            row("plan", "native", plan_us, target_us=PLAN_TARGET_US,
                ok=plan_us < PLAN_TARGET_US, correct=correct)
    graph_us = attempt("plan", "native_graph",
                       lambda: time_us(graph_of(plan_native), args.iters, args.warmup))
    if graph_us is not None:
        row("plan", "native_graph", graph_us, target_us=PLAN_TARGET_US, captured=True)
    ref_us = attempt("plan", "torch_reference",
                     lambda: time_us(plan_torch, args.iters, args.warmup))
    if ref_us is not None:
        row("plan", "torch_reference", ref_us)

    def topk_native():
        return torch.ops.canet.score_topk(x["hidden"], x["sizes"], x["weight"], x["bias"],
                                          x["history"], args.k)

    def topk_check():
        ids, scores = topk_native()
        ref_ids, ref_scores = torch_topk(x, args.k)
        # bf16 baseline scores are rounded to bf16, the op's are fp32: compare loosely.
        agree = float((ids == ref_ids).float().mean())
        max_diff = float((scores - ref_scores.float()).abs().max())
        return agree, max_diff

    check = attempt("score_topk", "native", topk_check)
    native_us = attempt("score_topk", "native",
                        lambda: time_us(topk_native, args.iters, args.warmup))
    topk_us = attempt("score_topk", "matmul_mask_topk",
                      lambda: time_us(lambda: torch_topk(x, args.k), args.iters, args.warmup))
    mm_us = attempt("score_topk", "matmul_only",
                    lambda: time_us(lambda: matmul_only(x), args.iters, args.warmup))
    if check is not None and native_us is not None:
        agree, max_diff = check
        extra = {"id_agreement": round(agree, 4), "max_score_diff": max_diff,
                 "correct": math.isfinite(max_diff) and max_diff <= TOPK_MAX_SCORE_DIFF}
        if topk_us is not None and mm_us is not None:
            speedup, ratio = topk_us / native_us, native_us / mm_us
            extra.update(speedup_vs_topk=round(speedup, 3), vs_matmul=round(ratio, 3),
                         ok=speedup >= TOPK_SPEEDUP_TARGET and ratio <= MATMUL_RATIO_TARGET)
        row("score_topk", "native", native_us, **extra)
    graph_us = attempt("score_topk", "native_graph",
                       lambda: time_us(graph_of(topk_native), args.iters, args.warmup))
    if graph_us is not None:
        row("score_topk", "native_graph", graph_us, captured=True)
    if topk_us is not None:
        row("score_topk", "matmul_mask_topk", topk_us)
    if mm_us is not None:
        row("score_topk", "matmul_only", mm_us)


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| op | method | us | notes |", "|---|---|---:|---|"]
    for r in results:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("op", "method", "us"))
        notes = notes.replace("|", "/").replace("\n", " ")[:300]
        us = "" if r.get("us") is None else f"{r['us']:.2f}"
        lines.append(f"| {r['op']} | {r['method']} | {us} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        x = make_inputs(args, "cpu")
        print(f"dry run: plan B={args.plan_batch}; score_topk B={args.batch} N={args.items} "
              f"H={args.hidden} L={args.history} k={args.k} {args.dtype}; "
              f"{sum(t.numel() * t.element_size() for t in x.values()) / 2**20:.1f} MiB of inputs")
        return 0
    if not torch.cuda.is_available():
        print("FAILED: bench_ops_gpu.py needs a CUDA device (use --dry-run without one)",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    gpu = torch.cuda.get_device_name()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = args.out / (args.name or f"{stamp}-{slug(gpu)}-ops")
    meta = {"gpu": gpu, "torch": torch.__version__,
            "dtype": args.dtype, "iters": args.iters, "batch": args.batch, "items": args.items,
            "hidden": args.hidden, "history": args.history, "k": args.k,
            "plan_batch": args.plan_batch, "status": "running"}
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def write() -> str:
        table = markdown(results, f"# canet op micro-benchmark {stamp} on {gpu} "
                                  f"({args.dtype}): {meta['status']}")
        write_json_and_markdown(f"{base}.json", {"meta": meta, "results": results},
                                f"{base}.md", table)
        return table

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        write()
        bench(args, results, on_row=write)
        meta["status"] = "complete"
    except Interrupted as exc:
        meta["status"] = f"interrupted ({exc})"
    except Exception as exc:  # outside any one measurement (inputs, CUDA init): recorded
        traceback.print_exc()
        results.append({"op": "setup", "method": "-", "us": None, "error": error_text(exc)})
        meta["status"] = "failed"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        meta["seconds"] = round(time.monotonic() - started, 1)
        table = write()
        print(f"wrote {base}.json and {base}.md")
    print(table)
    missed = [r for r in results if r.get("ok") is False]
    if missed:
        print("targets missed: " + ", ".join(f"{r['op']}/{r['method']}" for r in missed))
    failed = [r for r in results if "error" in r or r.get("correct") is False]
    if failed or meta["status"] != "complete":
        print("FAILED: " + ", ".join(f"{r['op']}/{r['method']}" for r in failed)
              + f" (status {meta['status']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
