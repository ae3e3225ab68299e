"""One writer per run directory (the lock) and consistent reads beside a training run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_csv_log as _write_log  # tests/ is on sys.path

from canet import cli
from canet.checkpoint import LOCK_FILE, load_checkpoint, lock_run_dir
from canet.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--max-len", "8", "--depths=[1,2]", "--hidden=[8,16]", "--emb=[8,16]",
             "--heads", "2", "--router-dim", "8", "--router-heads", "2",
             "--batch-size", "32", "--progress", "false", "--threads", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _wait_for_lock(run_dir: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    """The pid written into RUN_DIR/.lock once ``process`` holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        text = (run_dir / LOCK_FILE).read_text() if (run_dir / LOCK_FILE).exists() else ""
        if text.strip():
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the writer never took the lock")


def test_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from canet.checkpoint import lock_run_dir\n"
         "with lock_run_dir(sys.argv[1]):\n    time.sleep(60)", str(tmp_path)],
        env=_env(),
    )
    try:
        assert _wait_for_lock(tmp_path, holder) == holder.pid
        with pytest.raises(CheckpointError, match=f"in use by pid {holder.pid}"), \
                lock_run_dir(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The stale lock file of the killed process is simply locked again.
    assert (tmp_path / LOCK_FILE).exists()
    with lock_run_dir(tmp_path), lock_run_dir(tmp_path):  # re-entrant in one process
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with lock_run_dir(tmp_path):  # released after the outer exit
        pass


def test_two_trains_into_one_out_the_second_is_refused(tmp_path, capsys) -> None:
    """Issue 14 item 1: the second `canet train` exits 2 with one line naming the holder; the
    first finishes and its run loads."""
    data = _write_log(tmp_path / "log.csv")
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "canet", "train", "--data", str(data), "--out", str(out),
         *TINY_ARGS, "--epochs", "40", "--seed", "1"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pid = _wait_for_lock(out, first)
        status = cli.main(["train", "--data", str(data), "--out", str(out), *TINY_ARGS,
                           "--epochs", "1", "--seed", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith("canet: error: ") and f"in use by pid {pid}" in err[0]
        assert first.poll() is None, "the refusal must come while the first run trains"
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    loaded = load_checkpoint(out)
    assert loaded.config.seed == 1 and loaded.trainer_state["epoch"] >= 1
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob(".*.old-*"))


_TRAINER = """
import sys
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.train import train
data = build_dataset(synthetic_log(40, 20, 0, seq_len=(5, 12)), 8)
config = config_from_dict({"max_len": 8, "depths": [1], "hidden": [8], "emb": [8], "heads": 2,
    "router_dim": 8, "router_heads": 2, "epochs": int(sys.argv[2]), "batch_size": 64,
    "progress": False, "lr": 3e-2, "seed": 0, "threads": 1, "patience": 0})
train(config, data, sys.argv[1], log=lambda line: None)
"""


def test_readers_beside_a_training_run_always_load_a_complete_checkpoint(tmp_path) -> None:
    """Crash consistency for readers: one process trains and saves best/ (when it improves)
    and last/ every epoch while this one loads them in a loop; every load succeeds and is one
    complete checkpoint (the digests of trainer_state.json cover every file read)."""
    run = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, str(run), "400"], env=_env(),
                               stderr=subprocess.PIPE, text=True)
    loads, epochs = 0, set()
    try:
        # 15 s of loads once the first epoch is saved; the start-up (a new interpreter, torch,
        # the data) gets its own 60 s, so a loaded machine does not starve the test of loads.
        deadline = time.monotonic() + 60
        while trainer.poll() is None and time.monotonic() < deadline:
            if not loads and not (run / "last").exists():  # saved after best/, first epoch
                time.sleep(0.01)
                continue
            if not loads:
                deadline = time.monotonic() + 15
            best = load_checkpoint(run)
            state = best.trainer_state
            assert best.path.name == "best" or best.path.name.startswith(".best.old-")
            assert state["best_epoch"] == state["epoch"]
            last = load_checkpoint(run / "last")
            epochs.add(last.trainer_state["epoch"])
            loads += 1
    finally:
        trainer.kill()
        _, stderr = trainer.communicate()
    assert loads > 20 and len(epochs) > 5, (loads, epochs, stderr)


def test_evaluate_refuses_another_split_of_the_same_users_and_items(tmp_path, capsys) -> None:
    """Issue 14 item 2: a copy of the log without timestamps, rows in another order (same
    users and items) was evaluated silently on another leave-one-out split."""
    data = _write_log(tmp_path / "log.csv")
    rows = data.read_text().splitlines()[1:]
    reordered = tmp_path / "log.txt"  # user item, no timestamps, each user's rows reversed
    reordered.write_text("".join(f"{r.split(',')[0]} {r.split(',')[1]}\n" for r in rows[::-1]))
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(run), *TINY_ARGS,
                     "--epochs", "1"]) == 0
    capsys.readouterr()
    metrics = (run / "metrics.json").read_text()
    status = cli.main(["evaluate", str(run), "--data", str(reordered)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "not the split the checkpoint was trained on" in err[0]
    assert len(err[0]) < 300 + len(str(reordered))
    assert "--allow-different-data" in err[0]
    assert (run / "metrics.json").read_text() == metrics  # nothing written
    assert cli.main(["evaluate", str(run), "--data", str(reordered), "--allow-different-data",
                     "--output", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("canet: warning: ") and "not the split" in err
    assert cli.main(["evaluate", str(run), "--data", str(data)]) == 0
    assert "warning" not in capsys.readouterr().err
