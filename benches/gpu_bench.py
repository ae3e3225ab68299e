"""GPU benchmark of routed CANet inference: the Triton backend against the PyTorch baselines.

Times ``[B, N+1]`` scoring of a batch with given config ids (the router is excluded everywhere)
for B in {256, 4096}, L = 50, N in {3000, 40000} and three routing mixes:

* ``paper``: skewed toward small configs with mean FLOPs ~40% of the largest (the paper's
  55-65% reduction); defined once in :mod:`canet.bench`;
* ``uniform``: every config equally likely;
* ``largest``: every user on the largest config (the all-largest reference).

Methods: ``dense`` (PyTorch supernet, every user at the largest config, sliced path),
``masked`` (the masked training path, one-hot choices), ``torch`` / ``torch_graph`` (engine
torch backend eager / replayed from a CUDA graph recorded for the batch's plan), ``triton`` /
``triton_graph`` (engine triton backend eager / CUDA graph). The model is
:func:`canet.bench.build_model`'s (seeded random weights, residual scales in [0.5, 1]) in the
run's dtype; times are medians of CUDA-event-timed calls (:func:`canet.bench.time_repeats`).

Writes ``<out>/<date>-<gpu>.json`` and ``.md`` (``--out`` defaults to ``benches/results``;
``--name`` overrides the base name) after every cell, so a crash or a kill keeps the cells
already measured, and prints a short table last. A cell or method that raises is recorded with
its error and the run goes on; a cell whose triton scores fail the dtype rule of the GPU tests
(:func:`canet.bench.check_scores`: error against a float64 reference at most twice the PyTorch
supernet's in that dtype, plus an atol) is recorded with ``ok: false``. The exit status is 1
when any cell failed either way. For bf16 at L = 50 the files end with the Triton backend
issue's targets (:data:`TARGETS`), each cell's value and whether it passes; a missed target is
reported, not a failed run.
``--dry-run`` checks the arguments and the mixes without a GPU.
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

from canet import Engine, RoutingSpace, ops
from canet.bench import (
    DTYPES,
    Interrupted,
    check_scores,
    config_histogram,
    error_text,
    graph_of,
    machine_info,
    make_config_ids,
    max_relative_error,
    on_sigterm,
    slug,
    time_repeats,
    write_json_and_markdown,
)
from canet.bench import build_model as workload_model
from canet.flops import batch_flops

METHODS = ("dense", "masked", "torch", "torch_graph", "triton", "triton_graph")
MIXES = ("paper", "uniform", "largest")
# The Triton backend issue's targets (H100, bf16, L = 50): (what, cell (batch, items or None =
# every N, mix), summary column, lowest passing value).
TARGETS = (
    ("efficiency vs the all-largest batch", (4096, 3000, "paper"), "efficiency_vs_all_largest",
     0.85),
    ("speedup vs PyTorch dense / ideal speedup", (4096, 3000, "paper"),
     "speedup_vs_dense_over_ideal", 0.8),
    ("speedup vs the torch backend eager", (256, None, "paper"), "speedup_vs_torch_eager", 3.0),
    # "faster than the torch backend captured in a CUDA graph": eager, and both captured.
    ("triton eager vs the torch backend in a CUDA graph", (256, None, "paper"),
     "speedup_vs_torch_graph", 1.0),
    ("triton vs the torch backend, both in CUDA graphs", (256, None, "paper"),
     "graph_speedup_vs_torch_graph", 1.0),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--items", type=int, nargs="+", default=[3000, 40000])
    parser.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="stop starting new cells after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default=None,
                        help="base name of the result files (default <date>-<gpu>)")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and mixes only")
    args = parser.parse_args(argv)
    if args.name is not None and (not args.name or slug(args.name) != args.name):
        parser.error("--name may hold only letters, digits, '.', '_' and '-'")
    for name in ("batch", "items"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be >= 1")
    if args.max_len < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--max-len and --iters must be >= 1, --warmup >= 0")
    return args


def mix_ids(mix: str, space: RoutingSpace, batch: int, max_len: int, items: int, seed: int = 0):
    """Config ids ``[B]`` (CPU int64) of one routing mix: the CPU benchmark's generators
    (:func:`canet.bench.make_config_ids`), so both machines measure the same mixes."""
    return make_config_ids(mix, batch, space, seq_len=max_len, num_items=items, seed=seed)


def flops_fraction(ids: torch.Tensor, space: RoutingSpace, max_len: int, items: int) -> float:
    """FLOPs of the batch routed to ``ids`` ``[B]`` over FLOPs of every user at the largest."""
    routed = batch_flops(config_histogram(ids, space), space, max_len, items)
    largest = batch_flops(config_histogram(torch.full_like(ids, space.largest_id), space),
                          space, max_len, items)
    return routed / largest


def build_model(items: int, max_len: int, space: RoutingSpace, dtype: torch.dtype,
                device: str | torch.device = "cuda"):
    """The benchmarked CANet: :func:`canet.bench.build_model` (seeded random weights, residual
    scales in [0.5, 1]) in ``dtype`` on ``device``, eval mode. Not the model's default init:
    its 1e-8 residual scales make every block an identity, so neither the timings nor the
    correctness check (:func:`check_cell_scores`) would see attention or the FFN."""
    return workload_model(items, max_len, space).to(device=device, dtype=dtype).eval()


def check_cell_scores(got: torch.Tensor, model, seqs: torch.Tensor, ids: torch.Tensor) -> dict:
    """The correctness guard of one cell: the timed path's scores ``got`` ``[B, N+1]`` for
    ``seqs`` ``[B, L]`` routed to ``ids`` ``[B]``, judged by the GPU tests' dtype rule
    (:func:`canet.bench.check_scores` against ``model``, the benchmarked model in its dtype).
    Returns the cell's fields: ``check`` (errors, bound) and ``ok``."""
    verdict = check_scores(got, model, seqs, ids)
    return {"check": verdict.to_dict(), "ok": verdict.ok}


def bench_cell(model, engines, batch, max_len, items, mix, args, result: dict) -> dict:
    """Time every method of one cell into ``result`` (which holds the cell's keys and
    flops_fraction already) and check the triton scores (:func:`check_cell_scores`)."""
    space = model.space
    device = torch.device("cuda")
    ids_cpu = mix_ids(mix, space, batch, max_len, items)
    ids = ids_cpu.to(device)
    g = torch.Generator().manual_seed(batch)
    seqs = torch.randint(1, items + 1, (batch, max_len), generator=g).to(device)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g).to(device)
    seqs[torch.arange(max_len, device=device)[None, :] < (max_len - lengths)[:, None]] = 0
    plan = ops.plan(ids, space.table(device), check_ids=False, max_depth=space.max_depth)
    # The torch backend reads group sizes on the host: hand it host copies so that a graph
    # recorded for this plan never syncs (the graph is then valid for this mix only).
    host_plan = plan._replace(group_config=plan.group_config.cpu(),
                              group_offsets=plan.group_offsets.cpu())
    torch_impl, triton_impl = engines["torch"]._impl, engines["triton"]._impl
    largest = space.configs[space.largest_id]
    out = torch.empty(batch, items + 1, dtype=model.supernet.out.weight.dtype, device=device)
    one_hot = model.one_hot(ids)

    def dense():
        x = model.supernet.last_hidden(seqs, largest)
        return model.supernet.logits(x)

    calls = {
        "dense": dense,
        "masked": lambda: model.score_masked(seqs, one_hot),
        "torch": lambda: torch_impl.scores(seqs, host_plan),
        "triton": lambda: triton_impl.scores_from_ids(seqs, ids, out=out),
    }
    result["ms"], result["errors"] = {}, {}
    with torch.inference_mode():
        for method in args.methods:
            try:
                if method == "torch_graph":
                    fn = graph_of(calls["torch"])
                elif method == "triton_graph":
                    captured = triton_impl.capture(batch, routed=False)
                    fn = lambda c=captured: c(seqs, ids)  # noqa: E731
                else:
                    fn = calls[method]
                timing = time_repeats(fn, args.iters, warmup_calls=args.warmup, clock="cuda")
                result["ms"][method] = timing.median * 1e3
            except Exception as exc:  # recorded; the other methods still run
                result["errors"][method] = error_text(exc)
                traceback.print_exc()
        # Correctness guard: the timed triton path, judged by the GPU tests' dtype rule (the
        # distance to the torch backend is recorded too, for reading only).
        try:
            got = triton_impl.scores_from_ids(seqs, ids, out=out)
            want = torch_impl.scores(seqs, host_plan)
            result["triton_vs_torch_rel_err"] = max_relative_error(got.float(), want.float())
            result.update(check_cell_scores(got, model, seqs, ids))
            if not result["ok"]:
                check = result["check"]
                print(f"FAILED: triton scores off by {check['error']:.3g} (bound "
                      f"{check['bound']:.3g}: 2 x the PyTorch supernet's "
                      f"{check['supernet_error']:.3g} + {check['atol']:g}) "
                      f"(B={batch} N={items} {mix})", file=sys.stderr, flush=True)
        except Exception as exc:
            result["errors"]["check"] = error_text(exc)
            result["ok"] = False
            traceback.print_exc()
    if not result["errors"]:
        del result["errors"]
    return result


def summarize(results: list[dict]) -> list[dict]:
    """Derived ratios per (batch, items): efficiency vs all-largest, speedups."""
    rows = []
    largest = {(r["batch"], r["items"]): r for r in results if r["mix"] == "largest"}
    for r in results:
        ms = r.get("ms", {})
        row = {k: r[k] for k in ("batch", "items", "mix", "flops_fraction") if k in r}
        row.update({f"{m}_ms": round(v, 3) for m, v in ms.items()})
        if "ok" in r:
            row["ok"] = r["ok"]
        problems = [f"{m}: {e}" for m, e in r.get("errors", {}).items()]
        problems += [r[k] for k in ("error", "skipped") if k in r]
        if problems:  # one short cell: the JSON has the whole text
            row["error"] = "; ".join(problems).replace("|", "/").replace("\n", " ")[:160]
        ideal = 1.0 / r["flops_fraction"] if r.get("flops_fraction") else math.nan
        ref = largest.get((r["batch"], r["items"]))
        if ref and "triton" in ms and "triton" in ref.get("ms", {}):
            row["efficiency_vs_all_largest"] = round(ref["ms"]["triton"] / ms["triton"] / ideal, 3)
        if "dense" in ms and "triton" in ms:
            row["speedup_vs_dense_over_ideal"] = round(ms["dense"] / ms["triton"] / ideal, 3)
        if "torch" in ms and "triton" in ms:
            row["speedup_vs_torch_eager"] = round(ms["torch"] / ms["triton"], 2)
        if "torch_graph" in ms and "triton" in ms:
            row["speedup_vs_torch_graph"] = round(ms["torch_graph"] / ms["triton"], 2)
        if "torch_graph" in ms and "triton_graph" in ms:
            row["graph_speedup_vs_torch_graph"] = round(ms["torch_graph"] / ms["triton_graph"], 2)
        rows.append(row)
    return rows


def check_targets(rows: list[dict], dtype: str, max_len: int) -> list[dict]:
    """One row per (target, measured cell): the value, the bar, and whether it passes. Targets
    are stated for bf16 at L = 50; other settings get none. A cell that was not measured gets
    ``passed: None``."""
    if dtype != "bf16" or max_len != 50:
        return []
    checks = []
    for what, (batch, items, mix), column, bar in TARGETS:
        cells = [r for r in rows if r.get("batch") == batch and r.get("mix") == mix
                 and (items is None or r.get("items") == items)]
        for cell in cells or [{"items": items}]:
            value = cell.get(column)
            checks.append({"target": what, "batch": batch, "items": cell.get("items"),
                           "mix": mix, "value": value, "bar": bar,
                           "passed": None if value is None else value >= bar})
    return checks


def targets_markdown(checks: list[dict]) -> str:
    if not checks:
        return ""
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    lines = ["", "## Targets (the Triton backend issue)", "",
             "| target | B | N | mix | value | bar | passed |", "|---|---:|---:|---|---:|---:|---|"]
    lines += [f"| {c['target']} | {c['batch']} | {c['items'] or 'any'} | {c['mix']} | "
              f"{'' if c['value'] is None else c['value']} | >= {c['bar']} | "
              f"{verdict[c['passed']]} |" for c in checks]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], header: str) -> str:
    first, last = ("batch", "items", "mix", "flops_fraction"), ("ok", "error")

    def order(key: str):
        if key in first:
            return (0, first.index(key), key)
        return (2, last.index(key), key) if key in last else (1, 0, key)

    keys = sorted({k for row in rows for k in row}, key=order)
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    space = RoutingSpace()
    if args.dry_run:
        for mix in args.mixes:
            ids = mix_ids(mix, space, max(args.batch), args.max_len, max(args.items))
            frac = flops_fraction(ids, space, args.max_len, max(args.items))
            print(f"dry run: mix {mix}: flops fraction {frac:.3f}")
        return 0
    if not torch.cuda.is_available():
        print("FAILED: gpu_bench.py needs a CUDA device (use --dry-run without one)",
              file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    started = time.monotonic()
    gpu = torch.cuda.get_device_name()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = args.out / (args.name or f"{stamp}-{slug(gpu)}")
    meta = {"gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "iters": args.iters,
            "warmup": args.warmup, "budget_s": args.budget_s, "max_len": args.max_len,
            "status": "running"}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        meta["machine"] = machine_info()
    except Exception as exc:  # only metadata
        meta["machine"] = error_text(exc)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def write() -> str:
        rows = summarize(results)
        checks = check_targets(rows, args.dtype, args.max_len)
        text = markdown(rows, f"# canet GPU bench {stamp} on {gpu} ({args.dtype}): "
                              f"{meta['status']}") + targets_markdown(checks)
        write_json_and_markdown(f"{base}.json", {"meta": meta, "results": results,
                                                 "summary": rows, "targets": checks},
                                f"{base}.md", text)
        return text

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        write()
        for items in args.items:
            cells = [(batch, mix) for batch in args.batch for mix in args.mixes]
            if time.monotonic() - started > args.budget_s:  # not even the model is built
                for batch, mix in cells:
                    results.append({"batch": batch, "max_len": args.max_len, "items": items,
                                    "mix": mix, "skipped": f"budget of {args.budget_s:g} s spent"})
                print(f"budget of {args.budget_s}s spent: skipping N={items}", file=sys.stderr)
                write()
                continue
            try:
                model = build_model(items, args.max_len, space, dtype)
                engines = {name: Engine(model, backend=name) for name in ("torch", "triton")}
            except Exception as exc:
                traceback.print_exc()
                for batch, mix in cells:
                    results.append({"batch": batch, "max_len": args.max_len, "items": items,
                                    "mix": mix, "error": f"model/engines: {error_text(exc)}"})
                write()
                continue
            for batch, mix in cells:
                cell = {"batch": batch, "max_len": args.max_len, "items": items, "mix": mix}
                results.append(cell)
                if time.monotonic() - started > args.budget_s:
                    cell["skipped"] = f"budget of {args.budget_s:g} s spent"
                    print(f"budget of {args.budget_s}s spent: skipping B={batch} N={items} {mix}",
                          file=sys.stderr)
                    write()
                    continue
                try:
                    ids = mix_ids(mix, space, batch, args.max_len, items)
                    cell["flops_fraction"] = flops_fraction(ids, space, args.max_len, items)
                    bench_cell(model, engines, batch, args.max_len, items, mix, args, cell)
                except Exception as exc:  # recorded; the next cell still runs
                    cell["error"] = error_text(exc)
                    traceback.print_exc()
                print(json.dumps(cell), flush=True)
                write()
            del model, engines
            try:
                torch.cuda.empty_cache()
            except Exception:  # a failed kernel can leave the context unusable: go on anyway
                traceback.print_exc()
        meta["status"] = "complete"
    except Interrupted as exc:
        meta["status"] = f"interrupted ({exc}) after {time.monotonic() - started:.0f} s"
        print(f"gpu_bench: {meta['status']}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        meta["seconds"] = round(time.monotonic() - started, 1)
        failed = [r for r in results if "error" in r or r.get("errors") or r.get("ok") is False]
        meta["failed_cells"] = len(failed)
        table = write()
        print(f"wrote {base}.json and {base}.md")
    print(table)
    if failed or meta["status"] != "complete":
        print(f"FAILED: {len(failed)} cell(s) with errors or mismatches; status "
              f"{meta['status']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
