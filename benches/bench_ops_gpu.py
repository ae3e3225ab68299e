"""GPU micro-benchmark of the canet operators against their PyTorch equivalents.

* ``plan`` (B = 4096 users over the 36 configs): the native op eager and replayed from a CUDA
  graph (capture succeeding proves the op never syncs with the host), against the PyTorch
  reference (stable sorts, bincount, cumsum) eager. Target: < 20 us.
* ``score_topk`` (B = 4096, N = 40000, H = 128 with the paper's hidden sizes, L = 50 history
  items excluded, k = 10, bf16): the native op against ``matmul + masked_fill + topk`` on the
  full score matrix and against the matmul alone. Targets: >= 1.5x faster than the former,
  within 2x of the latter.

Writes ``benches/results/<date>-<gpu>-ops.json`` and ``.md`` (beside gpu_bench.py's
``<date>-<gpu>.{json,md}``) and prints the table last. ``--dry-run`` checks the arguments and
builds the inputs on the CPU without timing anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from canet import _ext, ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling GPU benchmark
from gpu_bench import graph_of, time_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN_SIZES = (64, 96, 128)
CONFIG_TABLE = [(d, h, e) for h in HIDDEN_SIZES for d in (2, 4, 6, 8) for e in HIDDEN_SIZES]
MAX_DEPTH = max(depth for depth, _, _ in CONFIG_TABLE)  # given to the op: no host sync
PLAN_TARGET_US = 20.0
TOPK_SPEEDUP_TARGET = 1.5
MATMUL_RATIO_TARGET = 2.0


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
    parser.add_argument("--dry-run", action="store_true", help="check arguments and inputs only")
    args = parser.parse_args(argv)
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
    return time_ms(fn, iters, warmup) * 1000.0


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


def bench(args: argparse.Namespace) -> list[dict]:
    x = make_inputs(args, "cuda")
    for h in HIDDEN_SIZES:  # grouping is the engine's job; the baseline gets it for free
        x[f"rows_{h}"] = (x["sizes"] == h).nonzero().squeeze(1)
    results = []

    def row(op, method, us, **extra):
        results.append({"op": op, "method": method, "us": round(us, 2), **extra})
        print(json.dumps(results[-1]), flush=True)

    if not _ext.has_kernel("plan", "cuda") or not _ext.has_kernel("score_topk", "cuda"):
        raise SystemExit(f"FAILED: canet._C has no CUDA kernels: {_ext.build_info()}")

    def plan_native():
        return torch.ops.canet.plan(x["config_ids"], x["table"], MAX_DEPTH)

    def plan_torch():
        return ops.plan_reference(x["config_ids"], x["table"], check_ids=False)

    p_native, p_ref = ops.Plan(*plan_native()), plan_torch()
    assert all(torch.equal(a, b) for a, b in zip(p_native, p_ref, strict=True)), "plan mismatch"
    plan_us = time_us(plan_native, args.iters, args.warmup)
    row("plan", "native", plan_us, target_us=PLAN_TARGET_US, ok=plan_us < PLAN_TARGET_US)
    graph_us = time_us(graph_of(plan_native), args.iters, args.warmup)
    row("plan", "native_graph", graph_us, target_us=PLAN_TARGET_US, captured=True)
    row("plan", "torch_reference", time_us(plan_torch, args.iters, args.warmup))

    def topk_native():
        return torch.ops.canet.score_topk(x["hidden"], x["sizes"], x["weight"], x["bias"],
                                          x["history"], args.k)

    ids, scores = topk_native()
    ref_ids, ref_scores = torch_topk(x, args.k)
    # bf16 baseline scores are rounded to bf16, the op's are fp32: compare the values loosely.
    agree = float((ids == ref_ids).float().mean())
    max_diff = float((scores - ref_scores.float()).abs().max())
    native_us = time_us(topk_native, args.iters, args.warmup)
    topk_us = time_us(lambda: torch_topk(x, args.k), args.iters, args.warmup)
    mm_us = time_us(lambda: matmul_only(x), args.iters, args.warmup)
    speedup = topk_us / native_us
    ratio = native_us / mm_us
    row("score_topk", "native", native_us, id_agreement=round(agree, 4),
        max_score_diff=max_diff, speedup_vs_topk=round(speedup, 3),
        vs_matmul=round(ratio, 3),
        ok=speedup >= TOPK_SPEEDUP_TARGET and ratio <= MATMUL_RATIO_TARGET)
    row("score_topk", "native_graph", time_us(graph_of(topk_native), args.iters, args.warmup),
        captured=True)
    row("score_topk", "matmul_mask_topk", topk_us)
    row("score_topk", "matmul_only", mm_us)
    return results


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| op | method | us | notes |", "|---|---|---:|---|"]
    for r in results:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("op", "method", "us"))
        lines.append(f"| {r['op']} | {r['method']} | {r['us']:.2f} | {notes} |")
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
        raise SystemExit("FAILED: bench_ops_gpu.py needs a CUDA device (use --dry-run without one)")
    results = bench(args)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "dtype": args.dtype, "iters": args.iters, "batch": args.batch, "items": args.items,
            "hidden": args.hidden, "history": args.history, "k": args.k,
            "plan_batch": args.plan_batch}
    path = args.out / f"{stamp}-{gpu}-ops"
    Path(f"{path}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, f"# canet op micro-benchmark {stamp} on {meta['gpu']} "
                              f"({args.dtype})")
    Path(f"{path}.md").write_text(table)
    print(f"wrote {path}.json and {path}.md")
    print(table)
    missed = [r for r in results if r.get("ok") is False]
    if missed:
        print("targets missed: " + ", ".join(f"{r['op']}/{r['method']}" for r in missed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
