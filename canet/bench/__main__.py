"""``canet bench`` / ``python -m canet.bench``: the command line of the CPU benchmark.

Measures users/s of every way to score a batch of users (:mod:`canet.bench.measure`), for
several routing mixes and batch sizes, prints the table and the target verdicts, and writes
JSON + Markdown (+ PNG plots with ``--plot``). The only module of :mod:`canet.bench` that
parses arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import backends as backend_registry
from ..config import PRECISIONS
from ..distributed import DistributedError
from ..errors import ConfigError
from ..serve import MISSING_EXTRA_HINT, missing_package
from ..space import RoutingSpace
from .analysis import MAX_REL_ERROR, evaluate_targets
from .measure import run
from .onnx_baseline import ORT
from .onnx_baseline import unavailable as ort_unavailable
from .report import (
    format_table,
    format_targets,
    machine_info,
    markdown,
    table_rows,
    write_json_and_markdown,
    write_plots,
)
from .serving import SERVE_CASES, measure_serving, serving_markdown
from .training import (
    TRAIN_ITEMS,
    TRAIN_USERS,
    distributed_training_markdown,
    measure_distributed_training,
    measure_training,
    training_markdown,
)
from .workload import (
    BATCHES,
    DEFAULT_BACKENDS,
    DEFAULT_SEED,
    MIXES,
    NUM_ITEMS,
    PAPER_FLOPS_FRACTION,
    SEQ_LEN,
    available_backends,
)

__all__ = ["main"]

# Flags of the inference benchmark that --train does not use.
INFERENCE_ONLY = ("--batch", "--mix", "--backends", "--baselines", "--plot", "--quick",
                  "--seq-len")
SERVE_ONLY = ("--clients", "--requests", "--cases", "--backend", "--max-batch-size",
              "--max-wait-ms", "--phase-timeout", "--rounds")


def default_out(name: str) -> Path:
    """Where results go without --out: benches/results/ when run from a canet checkout (the
    committed results live there), else ./canet-bench-results/, said on stderr, never a
    benches/ tree made up in whatever directory the command runs from."""
    if Path("benches").is_dir() and Path("canet").is_dir():
        return Path("benches/results") / name
    print("canet bench: not in a canet checkout (no ./benches, ./canet): writing to "
          "./canet-bench-results/ (pass --out to choose)", file=sys.stderr)
    return Path("canet-bench-results") / name


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return list(dict.fromkeys(names))

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canet bench",
        description="Users/s of routed inference vs the dense and masked PyTorch paths.",
    )
    parser.add_argument("--batch", type=_int_list, default=",".join(map(str, BATCHES)),
                        help="batch sizes (default: %(default)s)")
    parser.add_argument("--mix", type=_name_list(MIXES), default=",".join(MIXES),
                        help="routing mixes (default: %(default)s)")
    parser.add_argument("--backends", type=_name_list(backend_registry.BACKENDS),
                        default=",".join(DEFAULT_BACKENDS),
                        help="engine backends; unavailable ones are skipped with the reason "
                             "(default: %(default)s)")
    parser.add_argument("--baselines", type=_name_list((ORT,)), default=[],
                        help="extra baselines: ort = ONNX Runtime running the fixed "
                             "sub-network of each batch's FLOPs and the largest config "
                             "(needs pip install 'canet[onnx]'; exports each config it needs "
                             "with the dynamo exporter, seconds per config)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output; a .md table is written beside it "
                             "(default: benches/results/cpu-<date>.json in a canet checkout, "
                             "else canet-bench-results/cpu-<date>.json)")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR",
                        help="also write PNG plots to DIR (needs matplotlib)")
    parser.add_argument("--quick", action="store_true",
                        help="short timing budget (development; numbers are rough)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's current setting)")
    parser.add_argument("--items", type=int, default=None,
                        help=f"number of items N (default: {NUM_ITEMS}; with --train "
                             f"{TRAIN_ITEMS}; change only to test)")
    train = parser.add_argument_group(
        "training throughput (--train)",
        "one epoch (or its first steps) of CANet and the full-size model, new step vs the "
        "pre-issue-13 step, on a seeded synthetic log; reports seconds per epoch, targets/s "
        "and the fraction of the FLOP limit (canet/bench/training.py)")
    train.add_argument("--train", action="store_true",
                       help="measure training instead of inference")
    train.add_argument("--users", type=int, default=TRAIN_USERS,
                       help="users of the synthetic log (default: %(default)s)")
    train.add_argument("--steps", type=int, default=30,
                       help="batches timed with the new step; 0 = a whole epoch "
                            "(default: %(default)s)")
    train.add_argument("--old-steps", type=int, default=5,
                       help="batches timed with the old step; 0 = a whole epoch "
                            "(default: %(default)s)")
    train.add_argument("--device", default="cpu", help="training device (default: cpu)")
    train.add_argument("--precision", type=_name_list(PRECISIONS), default="fp32",
                       help="comma-separated training precisions, bf16 on CUDA only "
                            "(default: %(default)s)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="instead: epoch time of 1 process x T threads (--threads) vs N "
                            "processes x max(1, T/N) threads (DistributedDataParallel; on "
                            "CUDA one GPU per process), side by side; one precision, no old "
                            "step")
    serve = parser.add_argument_group(
        "serving load test (--serve)",
        "starts `canet serve`'s app on 127.0.0.1 (OS-chosen port) per case with the benchmark "
        "model (router fitted to the paper mix) and drives it with closed-loop clients of one "
        "user each: users/s, p50/p99 latency, mean batch, FLOPs served (canet/bench/serving.py)")
    serve.add_argument("--serve", action="store_true",
                       help="measure the HTTP service instead of the engine")
    serve.add_argument("--clients", type=int, default=64,
                       help="concurrent closed-loop clients (default: %(default)s)")
    serve.add_argument("--requests", type=int, default=3000,
                       help="measured requests per case, after 2 x clients warm-up ones "
                            "(default: %(default)s)")
    serve.add_argument("--cases", type=_name_list(SERVE_CASES), default=",".join(SERVE_CASES),
                       help="batched (micro-batching on), unbatched (--max-batch-size 1), "
                            "largest (batched, every user at the largest config) "
                            "(default: %(default)s)")
    serve.add_argument("--backend", default="auto",
                       help="the server's engine backend (default: %(default)s)")
    serve.add_argument("--max-batch-size", type=int, default=256,
                       help="the batched cases' max batch size (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="the batched cases' max wait (default: %(default)s)")
    serve.add_argument("--phase-timeout", type=float, default=300.0, metavar="S",
                       help="each load phase stops after S seconds (default: %(default)s)")
    serve.add_argument("--rounds", type=int, default=3,
                       help="interleaved rounds the measured requests of the cases are split "
                            "into (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN,
                        help="sequence length L (default: %(default)s; change only to test)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of model and inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``canet bench``: run, print the table and targets, write JSON + Markdown (+ plots)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            # Fail before minutes of measuring, not after.
            print("canet bench: --plot needs matplotlib, which is not installed; "
                  "run `pip install matplotlib` or drop --plot", file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.items is not None and args.items < 1 or args.seq_len < 1:
        parser.error("--items and --seq-len must be >= 1")
    if args.nproc is not None and (args.nproc < 1 or not args.train):
        parser.error(f"--nproc must be >= 1, got {args.nproc}" if args.nproc < 1
                     else "--nproc applies to --train only")
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    serve_flags = sorted(given & set(SERVE_ONLY))
    if serve_flags and not args.serve:
        parser.error(f"{', '.join(serve_flags)} apply to --serve only")
    if args.serve:
        if args.train:
            parser.error("--serve and --train are separate benchmarks: give one")
        ignored = sorted(given & set(INFERENCE_ONLY) - {"--seq-len"})
        if ignored:
            parser.error(f"{', '.join(ignored)} do not apply to --serve")
        return _main_serve(args, parser)
    if args.train:
        ignored = sorted(given & set(INFERENCE_ONLY))
        if ignored:
            parser.error(f"{', '.join(ignored)} do not apply to --train")
        if args.nproc is not None:
            return _main_train_nproc(args, parser, given)
        return _main_train(args, parser)
    if args.device != "cpu" or args.precision != ["fp32"]:
        parser.error("--device and --precision apply to --train only")
    args.items = args.items or NUM_ITEMS

    backends, skipped = available_backends(args.backends)
    for name, why in skipped.items():
        print(f"canet bench: skipping the {name} backend: {why}", file=sys.stderr)
    baselines = []
    for name in args.baselines:  # only "ort" so far
        why = ort_unavailable()
        if why is None:
            baselines.append(name)
        else:
            skipped[name] = why
            print(f"canet bench: skipping the {name} baseline: {why}", file=sys.stderr)
    min_time, min_repeats, warmup_time = (0.05, 1, 0.0) if args.quick else (1.0, 3, 0.2)
    out = args.out or default_out(f"cpu-{dt.date.today().isoformat()}.json")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"canet bench: N={args.items}, L={args.seq_len}, threads={torch.get_num_threads()}, "
        f"backends={','.join(backends) or 'none'}{' (quick)' if args.quick else ''}")
    cases, backends_run = run(
        args.batch, args.mix, backends, args.items, args.seq_len, args.seed,
        min_time, min_repeats, warmup_time, log, baselines=baselines,
    )
    space = RoutingSpace()
    report = {
        "schema": 1,
        "machine": machine_info(),
        "settings": {
            "num_items": args.items,
            "seq_len": args.seq_len,
            "space": space.to_dict(),
            "n_configs": space.n_configs,
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "batches": args.batch,
            "mixes": args.mix,
            "backends_requested": args.backends,
            "backends_run": backends_run,
            "backends_skipped": skipped,
            "baselines_requested": args.baselines,
            "baselines_run": baselines,
            "paper_flops_fraction_target": PAPER_FLOPS_FRACTION,
            "seed": args.seed,
            "quick": args.quick,
            "min_time": min_time,
            "min_repeats": min_repeats,
            "warmup_time": warmup_time,
            "standard_shape": (args.items, args.seq_len) == (NUM_ITEMS, SEQ_LEN),
        },
        "results": cases,
        "targets": evaluate_targets(cases, skipped),
    }
    machine = report["machine"]
    if baselines:
        import onnxruntime

        report["settings"]["onnxruntime"] = onnxruntime.__version__
    print(f"canet bench: {machine['cpu_model']}, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, N={args.items}, L={args.seq_len}"
          + (" (quick: rough numbers)" if args.quick else ""))
    for name, why in skipped.items():
        print(f"{name} {'baseline' if name == ORT else 'backend'} not measured: {why}")
    header, rows = table_rows(cases, backends_run)
    print(format_table(header, rows))
    for case in cases:
        for name, entry in case["backends"].items():
            if entry["max_rel_error"] > MAX_REL_ERROR:
                print(f"WARNING: {name} scores differ from model.score by "
                      f"{entry['max_rel_error']:.1e} (relative) at {case['mix']} "
                      f"B={case['batch']}")
    print()
    print("targets:")
    for line in format_targets(report["targets"]):
        print(f"  {line}")

    md_path = out.with_suffix(".md")
    write_json_and_markdown(out, report, md_path, markdown(report))
    print(f"\nwrote {out} and {md_path}")
    if args.plot is not None:
        for path in write_plots(report, args.plot):
            print(f"wrote {path}")
    return 0


def _main_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``canet bench --train``: the training-throughput table, JSON + Markdown."""
    if args.users < 10 or args.steps < 0 or args.old_steps < 0:
        parser.error("--users must be >= 10, --steps and --old-steps >= 0")
    out = args.out or default_out(f"train-cpu-{dt.date.today().isoformat()}.json")
    try:
        report = measure_training(
            threads=torch.get_num_threads(), num_users=args.users,
            num_items=args.items or TRAIN_ITEMS, steps=args.steps or None,
            old_steps=args.old_steps or None, device=args.device, precisions=args.precision,
            seed=args.seed, log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except ConfigError as error:  # e.g. bf16 on a CPU
        parser.error(str(error))
    return _write_report(report, "training", training_markdown, out)


def _main_train_nproc(
    args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str]
) -> int:
    """``canet bench --train --nproc N``: 1 process vs N processes, JSON + Markdown."""
    if "--old-steps" in given or len(args.precision) != 1:
        parser.error("--nproc times one precision with the current step: drop --old-steps "
                     "and give one --precision")
    if args.users < 10 or args.steps < 0:
        parser.error("--users must be >= 10, --steps >= 0")
    device = args.device.split(":")[0]  # a file-name piece: cuda:1 -> cuda
    out = args.out or default_out(
        f"train-nproc{args.nproc}-{device}-{dt.date.today().isoformat()}.json"
    )
    try:
        report = measure_distributed_training(
            nproc=args.nproc, threads=torch.get_num_threads(), num_users=args.users,
            num_items=args.items or TRAIN_ITEMS, steps=args.steps or None, device=args.device,
            precision=args.precision[0], seed=args.seed,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except ConfigError as error:  # e.g. bf16 on a CPU, more processes than GPUs
        parser.error(str(error))
    except DistributedError as error:  # a rank failed or hung: not a usage error
        print(f"canet bench: error: {error}", file=sys.stderr)
        return 1
    return _write_report(report, "training-nproc", distributed_training_markdown, out)


def _main_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``canet bench --serve``: the load test of ``canet serve``, JSON + Markdown."""
    if args.clients < 1 or args.requests < 1 or args.max_batch_size < 1 or args.rounds < 1:
        parser.error("--clients, --requests, --max-batch-size and --rounds must be >= 1")
    if args.requests < args.rounds:
        parser.error(f"--requests ({args.requests}) must be at least --rounds ({args.rounds})")
    if not args.max_wait_ms >= 0 or not args.phase_timeout > 0:
        parser.error("--max-wait-ms must be >= 0 and --phase-timeout > 0")
    missing = missing_package()
    if missing:
        print(f"canet bench: --serve needs the package {missing!r}, which is not installed: "
              f"{MISSING_EXTRA_HINT}", file=sys.stderr)
        return 2
    out = args.out or default_out(f"serve-cpu-{dt.date.today().isoformat()}.json")
    try:
        report = measure_serving(
            clients=args.clients, requests=args.requests, threads=args.threads,
            backend=args.backend, max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms, num_items=args.items or NUM_ITEMS,
            seq_len=args.seq_len, seed=args.seed, cases=tuple(args.cases),
            timeout_s=args.phase_timeout, rounds=args.rounds,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except RuntimeError as error:  # the server failed to start or answered no request
        print(f"canet bench: error: {error}", file=sys.stderr)
        return 1
    return _write_report(report, "serving", serving_markdown, out)


def _write_report(
    report: dict, kind: str, markdown: Callable[[dict, dict], str], out: Path
) -> int:
    """Add the schema, kind and machine to ``report``; print its Markdown table and write the
    JSON to ``out`` with the table beside it (``.md``)."""
    report = {"schema": 1, "kind": kind, "machine": machine_info(), **report}
    text = markdown(report, report["machine"])
    print(text)
    md_path = out.with_suffix(".md")
    write_json_and_markdown(out, report, md_path, text)
    print(f"wrote {out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
