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

**N processes vs one** (``canet bench --train --nproc N``,
:func:`measure_distributed_training`): the same epoch (prefix) timed in this process at T
threads and as a distributed run of N processes at ``max(1, T // N)`` threads each (started
here with the torchrun environment; gloo on CPUs, NCCL on CUDA with rank r on ``cuda:r``). A
distributed step processes the same global batch as one process's step, split across the
ranks, so steps/s and seconds per epoch compare directly. The ratio of the epoch times is
reported with no target: on a 2-core machine it is information.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from .._io import write_text_atomic
from ..config import config_from_dict
from ..data import InteractionLog, SequenceData, build_dataset
from ..errors import ConfigError
from ..flops import flops
from ..space import RoutingSpace
from ..train import time_training
from .report import last_line
from .timing import time_repeats
from .workload import DTYPES

__all__ = [
    "TRAIN_ITEMS",
    "TRAIN_MAX_LEN",
    "TRAIN_USERS",
    "TRAIN_TARGETS",
    "distributed_training_markdown",
    "gemm_flops_per_second",
    "measure_distributed_training",
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
            "steps": steps, "old_steps": old_steps, "seed": seed, **_log_settings(data),
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
    return {"model": model, "path": path, "precision": precision,
            **_run_row(record, epoch_batches)}


def _log_settings(data: SequenceData) -> dict[str, Any]:
    """How the synthetic log was drawn, and its lengths (the report's settings)."""
    return {
        "log": f"training_log(lengths {MIN_LENGTH} + floor(lognormal({LENGTH_MU}, "
               f"{LENGTH_SIGMA})), items Zipf {ITEM_ZIPF})",
        "mean_length": float(np.diff(data.offsets).mean()),
        "max_length": int(np.diff(data.offsets).max()),
    }


def measure_distributed_training(
    *,
    nproc: int,
    threads: int | None = None,
    num_users: int = TRAIN_USERS,
    num_items: int = TRAIN_ITEMS,
    steps: int | None = 30,
    models: Sequence[str] = MODELS,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    timeout_s: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Epoch time of one process at ``threads`` threads vs ``nproc`` processes at
    ``max(1, threads // nproc)`` threads each, per model; returns the report (JSON-able).

    ``threads``: T, the threads of the one-process run (default: torch's current setting).
    ``steps``: batches timed (None = the whole epoch); the distributed run's steps are the same
    global batches, split across the ranks, so its steps/s compare with one process's directly.
    The ranks are fresh processes, each given the torchrun environment (``MASTER_PORT``: a
    free port of 127.0.0.1), each building the seeded log itself (nothing large is sent),
    timing every model in turn in one process group; rank 0 returns its records. On CUDA rank r
    computes on ``cuda:r``, so ``nproc`` must not exceed the GPU count (ConfigError).
    ``timeout_s``: how long the ranks may take, start-up included (default: 120 s plus 10x the
    one-process runs), and the process group's timeout: a rank that fails or hangs raises
    DistributedError within it, never a hang.
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if not models:
        raise ConfigError(f"models must name at least one of {', '.join(MODELS)}")
    per_process = max(1, threads // nproc)
    configs = {}
    for name in models:
        if name not in MODELS:
            raise ConfigError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
        configs[name] = {
            "max_len": TRAIN_MAX_LEN, "batch_size": TRAIN_BATCH, "progress": False,
            "seed": seed, "device": device, "precision": precision,
            "fixed_config": None if name == "canet" else "largest",
        }
    # Validated here, before anything runs: a bad device or precision is one error, not N.
    torch_device = config_from_dict({**configs[models[0]], "threads": threads}).torch_device()
    if torch_device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"{nproc} processes on CUDA need {nproc} GPUs (rank r computes on cuda:r), but "
            f"this machine has {torch.cuda.device_count()}"
        )
    torch.set_num_threads(threads)
    data = training_data(num_users, num_items, seed)
    epoch_batches = data.num_train_batches(TRAIN_BATCH)
    log(f"training benchmark, 1 vs {nproc} process(es): {data.num_users} users, "
        f"{data.num_items} items, {len(data.sample_users)} windows ({epoch_batches} batches of "
        f"{TRAIN_BATCH}), {device}, {precision}; 1 x {threads} vs {nproc} x {per_process} "
        "thread(s)")
    single = {}
    for name, values in configs.items():
        record = time_training(config_from_dict({**values, "threads": threads}), data,
                               steps=steps)
        single[name] = {"model": name, "nproc": 1, "threads_per_process": threads,
                        **_run_row(record, epoch_batches)}
        _log_run(log, single[name])
    if timeout_s is None:
        # Start-up (a new interpreter, import torch, build the log, open the group) takes
        # seconds; a distributed step is at most a few times slower than one process's, even on
        # an overloaded machine.
        timeout_s = 120.0 + 10.0 * sum(run["seconds"] for run in single.values())
    job = {
        "configs": {name: {**values, "threads": per_process} for name, values in configs.items()},
        "users": num_users, "items": num_items, "seed": seed, "steps": steps,
        "device": device, "threads": per_process, "timeout_s": timeout_s,
    }
    ranks = _run_ranks(nproc, job, timeout_s)
    runs = []
    summary: dict[str, Any] = {}
    for name in configs:
        many = {"model": name, "nproc": nproc, "threads_per_process": per_process,
                **_run_row(ranks["records"][name], epoch_batches)}
        many["epoch_ratio_vs_one_process"] = many["epoch_seconds"] / single[name]["epoch_seconds"]
        _log_run(log, many)
        runs += [single[name], many]
        summary[f"{name}_epoch_{nproc}proc_vs_1proc"] = many["epoch_ratio_vs_one_process"]
    return {
        "settings": {
            "users": data.num_users, "items": data.num_items,
            "windows": int(len(data.sample_users)), "epoch_batches": epoch_batches,
            "batch_size": TRAIN_BATCH, "max_len": TRAIN_MAX_LEN, "threads": threads,
            "nproc": nproc, "threads_per_process": per_process, "device": device,
            "backend": ranks["backend"], "precision": precision, "steps": steps, "seed": seed,
            "gpus": ([torch.cuda.get_device_name(rank) for rank in range(nproc)]
                     if torch_device.type == "cuda" else None),
            **_log_settings(data),
        },
        "runs": runs,
        "summary": summary,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _log_run(log: Callable[[str], None], run: dict[str, Any]) -> None:
    log(f"  {run['model']:<5} {run['nproc']} x {run['threads_per_process']} thread(s): "
        f"{run['steps']} steps in {run['seconds']:.1f}s, {run['steps_per_second']:.2f} steps/s, "
        f"{run['targets_per_second']:,.0f} targets/s, epoch ~{run['epoch_seconds']:.0f}s")


def _free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (rank 0 binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(nproc: int, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Start the ``nproc`` ranks of ``job`` (:func:`_rank_main`), wait for them at most
    ``timeout_s`` seconds, and return rank 0's result. DistributedError when a rank fails,
    dies or the time runs out (every rank still running is killed first).

    Each rank is a fresh interpreter (``python -c``), not a multiprocessing child: it gets the
    environment exactly as torchrun gives it, and the caller's main module is never re-imported
    (spawn would need an ``if __name__ == "__main__"`` guard in every script that calls this)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding this canet
    env = {
        **os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": str(job["threads"]),
        "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
    }
    # os._exit after a rank's work: the interpreter's teardown can abort in torch's
    # distributed C++ state (see canet.cli.main), which would read as a failed rank.
    code = ("import os, sys; from canet.bench.training import _rank_main; "
            "_rank_main(sys.argv[1]); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")
    with tempfile.TemporaryDirectory(prefix="canet-bench-ranks-") as name:
        folder = Path(name)
        (folder / "job.json").write_text(json.dumps(job))
        ranks: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(nproc):
                with open(folder / f"rank{rank}.log", "wb") as output:  # the child keeps its fd
                    ranks.append(subprocess.Popen(
                        [sys.executable, "-c", code, str(folder)],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    ))
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [process.poll() for process in ranks]
                failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
                if failed:
                    # The lowest failed rank: the others usually fail because of it.
                    rank = failed[0]
                    raise distributed.DistributedError(
                        f"rank {rank} of the {nproc}-process training run failed (exit status "
                        f"{codes[rank]}): {last_line(folder / f'rank{rank}.log')}"
                    )
                if all(code == 0 for code in codes):
                    break
                if time.monotonic() >= deadline:
                    raise distributed.DistributedError(
                        f"the {nproc}-process training run did not finish within "
                        f"{timeout_s:.0f} s; its ranks were stopped"
                    )
                time.sleep(0.1)
        finally:
            for process in ranks:  # after a failure, a timeout or Ctrl-C: none is left behind
                if process.poll() is None:
                    process.kill()  # a rank in a collective's C call may ignore SIGTERM
                process.wait()
        try:
            return json.loads((folder / "rank0.json").read_text())
        except (OSError, ValueError) as error:
            raise distributed.DistributedError(
                f"rank 0 of the {nproc}-process training run left no result ({error})"
            ) from None


def _rank_main(folder: str) -> None:
    """One rank of :func:`measure_distributed_training` (``python -c``, started by
    :func:`_run_ranks` with the torchrun environment): the seeded log, one process group, every
    model's timing; rank 0 writes the records to ``folder/rank0.json``."""
    job = json.loads((Path(folder) / "job.json").read_text())
    env = distributed.environment()
    if env is None:
        raise distributed.DistributedError("a benchmark rank needs RANK and WORLD_SIZE set")
    torch.set_num_threads(job["threads"])
    data = training_data(job["users"], job["items"], job["seed"])
    group = distributed.start(env, torch.device(job["device"]), timeout_s=job["timeout_s"])
    try:
        records = {
            name: time_training(config_from_dict(values), data, steps=job["steps"], group=group)
            for name, values in job["configs"].items()
        }
        group.barrier()  # as canet train: no rank closes the group while another still uses it
    finally:
        group.close()
    if group.is_main:
        write_text_atomic(json.dumps({"backend": group.backend, "records": records}),
                          Path(folder) / "rank0.json")


def _run_row(record: dict[str, Any], epoch_batches: int) -> dict[str, Any]:
    """The report's timing fields of a :func:`time_training` record; seconds per epoch
    extrapolated from the steps timed."""
    return {
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


def distributed_training_markdown(report: dict[str, Any], machine: dict[str, Any]) -> str:
    """The table of :func:`measure_distributed_training`: per model, one process and N
    processes side by side."""
    s = report["settings"]
    git = machine.get("git") or {}
    commit = str(git.get("commit", "unknown"))[:12] + (" (dirty)" if git.get("dirty") else "")
    where = ", ".join(s["gpus"]) if s.get("gpus") else machine.get("cpu_model")
    lines = [
        f"# Training throughput, 1 vs {s['nproc']} process(es) (`canet bench --train --nproc "
        f"{s['nproc']}`)",
        "",
        f"{where}, {s['device']} ({s['backend']}), {s['precision']}, torch "
        f"{machine.get('torch')}, git {commit}, {report['date']}.",
        f"Synthetic log: {s['users']:,} users, {s['items']:,} items, {s['windows']:,} training "
        f"windows, mean length {s['mean_length']:.1f}, max {s['max_length']}; global batch "
        f"{s['batch_size']} (split across the processes), max_len {s['max_len']}; "
        f"{s['epoch_batches']} batches per epoch. {s['threads']} thread(s) in all: 1 process x "
        f"{s['threads']} vs {s['nproc']} x {s['threads_per_process']}. No target: the ratio is "
        "information.",
        "",
        "| model | processes x threads | steps timed | s/step | steps/s | targets/s | epoch (s) "
        "| epoch vs 1 process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        ratio = r.get("epoch_ratio_vs_one_process", 1.0)
        lines.append(
            f"| {r['model']} | {r['nproc']} x {r['threads_per_process']} | {r['steps']} "
            f"| {r['seconds'] / r['steps']:.3f} | {r['steps_per_second']:.2f} "
            f"| {r['targets_per_second']:,.0f} | {r['epoch_seconds']:.1f}"
            f"{'' if r['measured_whole_epoch'] else ' (extrapolated)'} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"
