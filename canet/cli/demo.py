"""``canet demo``: the whole job in one command, on an embedded synthetic log or a real one.

Trains CANet and the full-size baseline (the largest sub-network alone) with the same code,
evaluates both on the test split, and prints NDCG@10 / recall@10, the FLOPs reduction, the
routing histogram and the measured speed of ``canet.Engine`` (routed) against the model run
dense at the largest config. The default sizes keep both trainings under 5 minutes on 2 CPU
cores; ``--quick`` shrinks everything to seconds (for tests).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..bench.timing import time_repeats
from ..checkpoint import load_checkpoint
from ..config import TrainConfig, config_from_dict
from ..data import build_dataset, read_interactions, synthetic_log
from ..engine import Engine
from ..errors import CanetError
from ..evaluate import evaluate, format_histogram
from ..train import train
from .output import write_metrics

__all__ = ["DEMO_SETTINGS", "QUICK_SETTINGS", "run_demo", "add_arguments", "run"]

# A scaled-down routing space with the paper's shape: 4 depths x 3 widths x 3 emb = 36 configs.
DEMO_SETTINGS: dict[str, Any] = {
    "max_len": 20,
    "depths": [1, 2, 3, 4],
    "hidden": [32, 48, 64],
    "emb": [32, 48, 64],
    "heads": 2,
    "router_dim": 32,
    "dropout": 0.1,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,
    "eval_every": 2,
    "patience": 6,
    # Synthetic users repeat items (the "cycle" kind), so the repeated target must stay
    # rankable; on a real log (--data) the paper's protocol (history excluded) is used.
    "exclude_history": False,
    "eval_batch_size": 512,
}
DEMO_DATA = {"num_users": 600, "num_items": 300, "seq_len": (12, 40)}
QUICK_SETTINGS: dict[str, Any] = {
    **DEMO_SETTINGS,
    "max_len": 10,
    "depths": [1, 2],
    "hidden": [16, 32],
    "emb": [16, 32],
    "router_dim": 16,
    "epochs": 2,
    "batch_size": 64,
    "eval_every": 1,
}
QUICK_DATA = {"num_users": 120, "num_items": 60, "seq_len": (6, 16)}


def run_demo(
    data_path: str | None = None,
    out_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    backend: str = "auto",
    threads: int = 0,
    log=print,
) -> dict[str, Any]:
    """Train CANet and the full-size baseline, evaluate and time them; returns the summary."""
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(data_path, out_dir, quick, seed, epochs, backend, threads, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(
    data_path: str | None,
    out_dir: str | Path | None,
    quick: bool,
    seed: int,
    epochs: int | None,
    backend: str,
    threads: int,
    log,
) -> dict[str, Any]:
    started = time.perf_counter()
    settings = dict(QUICK_SETTINGS if quick else DEMO_SETTINGS)
    settings.update(seed=seed, threads=threads, progress=not quick)
    if epochs is not None:
        settings["epochs"] = epochs
    if data_path is None:
        sizes = QUICK_DATA if quick else DEMO_DATA
        log_data = synthetic_log(sizes["num_users"], sizes["num_items"], seed,
                                 seq_len=sizes["seq_len"])
        source = (f"synthetic log ({sizes['num_users']} users of 3 behaviour kinds, "
                  f"{sizes['num_items']} items, seed {seed})")
    else:
        log_data = read_interactions(data_path)
        settings["max_len"] = 10 if quick else 50
        settings["exclude_history"] = True
        source = data_path
    config: TrainConfig = config_from_dict(settings)
    data = build_dataset(log_data, config.max_len)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="canet-demo-"))
    log(f"canet demo: {source}: {data.num_users} users, {data.num_items} items, "
        f"{len(data.items)} interactions; runs in {out}")

    runs = {"canet": config, "full": config_from_dict({"fixed_config": "largest"}, config)}
    results: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float] = {}
    for name, run_config in runs.items():
        log(f"\n== training {'CANet' if name == 'canet' else 'full-size baseline'} ==")
        tic = time.perf_counter()
        train(run_config, data, out / name, overwrite=True, log=log)
        train_seconds[name] = time.perf_counter() - tic
        loaded = load_checkpoint(out / name)
        results[name] = evaluate(
            loaded.model, data, "test", ks=run_config.ks, batch_size=run_config.eval_batch_size,
            exclude_history=run_config.exclude_history,
            fixed_config_id=run_config.fixed_config_id(loaded.model.space),
        )
        write_metrics(results[name], out / name / "metrics.json")
        if name == "canet":
            canet_model = loaded.model

    # Inference speed on the test users: the engine runs each user's own sub-network only.
    seqs = torch.cat([s for _, s, _ in data.eval_batches("test", 4096)])
    canet_model.eval()
    engine = Engine(canet_model, backend=backend)
    largest = torch.full((seqs.shape[0],), canet_model.space.largest_id, dtype=torch.int64)
    repeats = 1 if quick else 5
    with torch.inference_mode():
        routed_s = time_repeats(lambda: engine.score(seqs), repeats).median
        dense_s = time_repeats(lambda: canet_model.score(seqs, largest), repeats).median
    summary = {
        "data": source,
        "num_users": results["canet"]["num_users"],
        "num_items": data.num_items,
        "exclude_history": config.exclude_history,
        "canet": results["canet"]["metrics"],
        "full": results["full"]["metrics"],
        "flops_reduction": results["canet"]["flops"]["reduction_vs_largest"],
        "flops_reduction_with_router": (
            results["canet"]["flops"]["reduction_vs_largest_with_router"]
        ),
        "routing_histogram": results["canet"]["routing"]["histogram"],
        "configs": results["canet"]["routing"]["configs"],
        "engine_backend": engine.backend,
        "engine_routed_seconds": routed_s,
        "model_dense_largest_seconds": dense_s,
        "speedup": dense_s / routed_s if routed_s > 0 else float("nan"),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "out_dir": str(out),
    }
    write_metrics(summary, out / "summary.json")
    log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    canet, full = summary["canet"], summary["full"]
    configs = summary["configs"]
    histogram = summary["routing_histogram"]
    top = sorted(((n, i) for i, n in enumerate(histogram) if n), reverse=True)[:5]
    lines = [
        "",
        "=" * 72,
        f"CANet demo summary ({summary['num_users']} test users, {summary['num_items']} items, "
        f"full ranking, history {'excluded' if summary['exclude_history'] else 'kept'})",
        f"{'':22}{'NDCG@10':>10}{'recall@10':>12}",
        f"{'CANet (routed)':22}{canet['ndcg@10']:>10.4f}{canet['recall@10']:>12.4f}",
        f"{'full-size baseline':22}{full['ndcg@10']:>10.4f}{full['recall@10']:>12.4f}",
        f"FLOPs reduction vs the largest sub-network: {100 * summary['flops_reduction']:.1f}% "
        f"({100 * summary['flops_reduction_with_router']:.1f}% counting the router)",
        "routing: " + format_histogram(histogram),
        "  " + ", ".join(f"c{i}=(depth {configs[i][0]}, hidden {configs[i][1]}, emb "
                          f"{configs[i][2]})" for _, i in top),
        f"inference on the test users: Engine[{summary['engine_backend']}] routed "
        f"{1000 * summary['engine_routed_seconds']:.1f} ms vs model dense at the largest config "
        f"{1000 * summary['model_dense_largest_seconds']:.1f} ms -> speedup "
        f"{summary['speedup']:.2f}x",
        f"training: CANet {summary['train_seconds']['canet']:.0f}s, full-size "
        f"{summary['train_seconds']['full']:.0f}s; total {summary['total_seconds']:.0f}s; "
        f"runs in {summary['out_dir']}",
        "=" * 72,
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a real interaction log (default: embedded synthetic log)")
    parser.add_argument("--out", help="where the two runs go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for tests)")
    parser.add_argument("--epochs", type=int, help="epochs per model (default 40; quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--backend", default="auto", help="canet.Engine backend to time")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise CanetError(f"demo: unknown arguments {extra}")
    run_demo(args.data, args.out, quick=args.quick, seed=args.seed, epochs=args.epochs,
             backend=args.backend, threads=args.threads)
    return 0
