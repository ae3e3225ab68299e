"""Training throughput: ``canet bench --train`` and ``benches/bench_train.py``.

Times the training loop (:func:`canet.train.time_training`: the loop of :func:`canet.train.train`
without validation or checkpoints) for CANet and for the full-size model (the largest
sub-network alone), each with the current step and with the step as it was before issue 13
(full ``max_len`` batches in the plain order, logits at every position, every gradient read
back), side by side in one run, on a seeded synthetic log shaped like a public mid-size log.
The old step is emulated inside today's loop, so it shares today's fused Adam, in-place padding
column and cached mask tables: the new-vs-old speedup it reports is, if anything, too small.

**The fraction of the FLOP limit.** The real work of an epoch is its real targets (positions
with a next item; padding excluded) times the forward+backward FLOPs of one target at the
largest config::

    per_target = 3 * canet.flops(largest, seq_len=1, num_items)
               = 3 * (2 e h + d (24 h^2 + 4 h) + 2 h (N + 1))

i.e. one token through the input projection and every block's linears, plus the output layer
over all N+1 items (attention's ``4 L h`` per block and token is counted at L = 1: under 2% at
these lengths), and a backward pass that costs twice the forward. The fraction is
``targets_per_second * per_target / gemm_flops_per_second``, where the limit is a large
float32 matmul (``torch.mm`` of 2048 x 2048 matrices, best of several) at the same thread count,
measured in the same run (before and after the training runs; the higher of the two). The same
per-target count is used for CANet (its router, guide pass and masks are its own overhead).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..config import config_from_dict
from ..data import InteractionLog, SequenceData, build_dataset
from ..flops import flops
from ..space import RoutingSpace
from ..train import time_training
from .timing import time_repeats
from .workload import DTYPES

__all__ = [
    "TRAIN_ITEMS",
    "TRAIN_MAX_LEN",
    "TRAIN_USERS",
    "TRAIN_TARGETS",
    "gemm_flops_per_second",
    "measure_training",
    "per_target_flops",
    "training_data",
    "training_log",
    "training_markdown",
]

# A public mid-size log's shape (Amazon Video Games / Steam-like after 5-core filtering).
TRAIN_USERS = 30_000
TRAIN_ITEMS = 24_000
TRAIN_MAX_LEN = 50
TRAIN_BATCH = 128
MIN_LENGTH = 5  # 5-core filtered logs start at 5 interactions per user
# Lengths 5 + floor(lognormal(0.8, 1.1)): mean about 9, a heavy tail far beyond max_len 50.
LENGTH_MU, LENGTH_SIGMA = 0.8, 1.1
ITEM_ZIPF = 0.8  # item popularity ~ rank^-0.8
# The targets (2 cores, same run).
TRAIN_TARGETS = {
    "full_min_flop_fraction": 1 / 3,
    "canet_max_epoch_ratio_vs_full": 1.3,
}
MODELS = ("canet", "full")
PATHS = ("new", "old")


def training_log(
    num_users: int = TRAIN_USERS, num_items: int = TRAIN_ITEMS, seed: int = 0
) -> InteractionLog:
    """A seeded synthetic log: per-user lengths ``5 + floor(lognormal(0.8, 1.1))`` (mean about
    9, max far above 50), items drawn by Zipf popularity. For timing, not for accuracy."""
    rng = np.random.default_rng(seed)
    lengths = MIN_LENGTH + np.floor(
        rng.lognormal(LENGTH_MU, LENGTH_SIGMA, size=num_users)
    ).astype(np.int64)
    weights = np.arange(1, num_items + 1, dtype=np.float64) ** -ITEM_ZIPF
    items = rng.choice(num_items, size=int(lengths.sum()), p=weights / weights.sum()) + 1
    users = np.repeat(np.arange(num_users), lengths)
    return InteractionLog(
        users=users.astype(str).astype(object),
        items=items.astype(str).astype(object),
        timestamps=np.arange(len(users), dtype=np.float64),
        path="<synthetic training log>",
        format="synthetic",
        has_timestamps=False,
    )


def training_data(
    num_users: int = TRAIN_USERS, num_items: int = TRAIN_ITEMS, seed: int = 0,
    max_len: int = TRAIN_MAX_LEN,
) -> SequenceData:
    return build_dataset(training_log(num_users, num_items, seed), max_len)


def per_target_flops(space: RoutingSpace, num_items: int) -> int:
    """Forward+backward FLOPs of one real target at the largest config (module docstring)."""
    return 3 * flops(space.configs[space.largest_id], 1, num_items)


def gemm_flops_per_second(
    size: int | None = None, repeats: int = 5, device: str = "cpu", precision: str = "fp32"
) -> float:
    """The FLOP limit: the best of ``repeats`` ``torch.mm`` calls of two ``size x size``
    matrices (2048 on CPU, at the current thread count; 8192 on CUDA) in the precision's
    dtype (fp32 follows torch's tf32 switch on CUDA, as training does)."""
    size = size or (8192 if device.startswith("cuda") else 2048)
    dtype = DTYPES[precision]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    clock = "cuda" if device.startswith("cuda") else "wall"
    timing = time_repeats(lambda: torch.mm(a, b, out=out), repeats, warmup_calls=2, clock=clock)
    return 2 * size**3 / min(timing.times)


def measure_training(
    *,
    threads: int,
    num_users: int = TRAIN_USERS,
    num_items: int = TRAIN_ITEMS,
    steps: int | None = 30,
    old_steps: int | None = 5,
    models: Sequence[str] = MODELS,
    paths: Sequence[str] = PATHS,
    device: str = "cpu",
    precisions: Sequence[str] = ("fp32",),
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Time every (model, path, precision) on one synthetic log; returns the report (JSON-able).

    ``steps`` / ``old_steps``: batches timed with the new / old step (None = the whole epoch);
    the batch order is random, so a prefix is a fair sample, and seconds per epoch are
    extrapolated from it (``epoch_seconds``; ``measured_whole_epoch`` says when they were not).
    The old step runs in fp32 only. Each run's fraction of the FLOP limit is against a matmul
    in its own precision on ``device``.
    """
    torch.set_num_threads(threads)
    data = training_data(num_users, num_items, seed)
    space = RoutingSpace()
    per_target = per_target_flops(space, data.num_items)
    epoch_batches = data.num_train_batches(TRAIN_BATCH)
    log(f"training benchmark: {data.num_users} users, {data.num_items} items, "
        f"{len(data.sample_users)} windows ({epoch_batches} batches of {TRAIN_BATCH}), "
        f"{device}, {threads} thread(s)")
    gemm_before = {p: gemm_flops_per_second(device=device, precision=p) for p in precisions}
    runs = []
    for model in models:
        for path in paths:
            for precision in precisions:
                if path == "old" and precision != "fp32":
                    continue
                config = config_from_dict({
                    "max_len": TRAIN_MAX_LEN, "batch_size": TRAIN_BATCH, "threads": threads,
                    "progress": False, "seed": seed, "device": device, "precision": precision,
                    "fixed_config": None if model == "canet" else "largest",
                })
                runs.append(_timed_run(config, data, model, path, precision,
                                       steps if path == "new" else old_steps, epoch_batches))
                run = runs[-1]
                log(f"  {model:<5} {path} {precision}: {run['steps']} steps in "
                    f"{run['seconds']:.1f}s, {run['targets_per_second']:,.0f} targets/s, "
                    f"epoch ~{run['epoch_seconds']:.0f}s")
    gemm = {p: max(gemm_before[p], gemm_flops_per_second(device=device, precision=p))
            for p in precisions}
    for run in runs:
        run["flop_fraction"] = run["targets_per_second"] * per_target / gemm[run["precision"]]
    by = {(r["model"], r["path"]): r for r in runs if r["precision"] == "fp32"}
    summary: dict[str, Any] = {}
    for model in models:
        if (model, "new") in by and (model, "old") in by:
            summary[f"{model}_speedup_new_vs_old"] = (
                by[model, "old"]["epoch_seconds"] / by[model, "new"]["epoch_seconds"]
            )
    targets = []
    if ("full", "new") in by:
        value = by["full", "new"]["flop_fraction"]
        bar = TRAIN_TARGETS["full_min_flop_fraction"]
        targets.append({"name": "full-size epoch: fraction of the FLOP limit", "value": value,
                        "bar": f">= {bar:.3f}", "passed": value >= bar})
    if ("full", "new") in by and ("canet", "new") in by:
        value = by["canet", "new"]["epoch_seconds"] / by["full", "new"]["epoch_seconds"]
        bar = TRAIN_TARGETS["canet_max_epoch_ratio_vs_full"]
        targets.append({"name": "CANet epoch / full-size epoch", "value": value,
                        "bar": f"<= {bar}", "passed": value <= bar})
    return {
        "settings": {
            "users": data.num_users, "items": data.num_items,
            "windows": int(len(data.sample_users)), "epoch_batches": epoch_batches,
            "batch_size": TRAIN_BATCH, "max_len": TRAIN_MAX_LEN, "threads": threads,
            "device": device, "precisions": list(precisions),
            "steps": steps, "old_steps": old_steps, "seed": seed,
            "log": f"training_log(lengths {MIN_LENGTH} + floor(lognormal({LENGTH_MU}, "
                   f"{LENGTH_SIGMA})), items Zipf {ITEM_ZIPF})",
            "mean_length": float(np.diff(data.offsets).mean()),
            "max_length": int(np.diff(data.offsets).max()),
        },
        "per_target_flops": per_target,
        "gemm_flops_per_second": gemm,
        "gemm_flops_per_second_before": gemm_before,
        "runs": runs,
        "summary": summary,
        "targets": targets,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _timed_run(config, data, model, path, precision, limit, epoch_batches) -> dict[str, Any]:
    record = time_training(config, data, steps=limit, reference_step=path == "old")
    return {
        "model": model,
        "path": path,
        "precision": precision,
        "steps": record["steps"],
        "targets": record["targets"],
        "seconds": record["train_seconds"],
        "steps_per_second": record["steps_per_second"],
        "targets_per_second": record["targets_per_second"],
        "epoch_seconds": record["train_seconds"] / record["steps"] * epoch_batches,
        "measured_whole_epoch": record["steps"] == epoch_batches,
        "loss": record["loss"],
    }


def training_markdown(report: dict[str, Any], machine: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Training throughput (`canet bench --train`)",
        "",
        f"{machine.get('cpu_model')}, {s['threads']} thread(s), torch {machine.get('torch')}, "
        f"git {machine.get('git')}, {report['date']}.",
        f"Synthetic log: {s['users']:,} users, {s['items']:,} items, {s['windows']:,} training "
        f"windows, mean length {s['mean_length']:.1f}, max {s['max_length']}; batch "
        f"{s['batch_size']}, max_len {s['max_len']}; {s['epoch_batches']} batches per epoch.",
        "FLOP limit (matmul on "
        f"{s['device']}, same threads, same run): "
        + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s"
                    for p, v in report["gemm_flops_per_second"].items())
        + f"; real work: {report['per_target_flops'] / 1e6:.1f} MFLOP per target "
        "(forward+backward at the largest config, see canet/bench/training.py).",
        "",
        "| model | step | precision | steps timed | s/step | targets/s | epoch (s) "
        "| fraction of FLOP limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['precision']} | {r['steps']} "
            f"| {r['seconds'] / r['steps']:.3f} | "
            f"{r['targets_per_second']:,.0f} | {r['epoch_seconds']:.1f}"
            f"{'' if r['measured_whole_epoch'] else ' (extrapolated)'} | "
            f"{r['flop_fraction']:.3f} (1/{1 / r['flop_fraction']:.1f}) |"
        )
    lines += ["", "| summary | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["summary"].items()]
    lines += ["", "| target | value | bar | passed |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        passed = "yes" if t["passed"] else "**no**"
        lines.append(f"| {t['name']} | {t['value']:.3f} | {t['bar']} | {passed} |")
    return "\n".join(lines) + "\n"
