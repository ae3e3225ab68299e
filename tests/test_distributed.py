"""Distributed training and evaluation (torchrun + DDP, gloo on CPU): the same results as one
process, whatever the number of ranks; resume; a failing or silent rank stops the job.

The ranks run as real processes: ``torchrun`` itself in one test (as a user starts it), else
one subprocess per rank with the environment torchrun would give it (tests/dist_worker.py),
so a test can make one rank fail. One thread per rank (CI has 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_csv_log

from canet import checkpoint as ckpt
from canet import cli, distributed
from canet.config import load_config
from canet.data import load_dataset
from canet.train import _Run

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ML100K = ROOT.parent / "shared" / "data" / "ml-100k.inter"
# A small routing space; dropout 0 (dropout masks are the one thing that differs with the
# number of ranks); batch 25 of 76 windows: the last batch has ONE window, so rank 1's share
# of it is empty (it runs a stand-in window that must add nothing); evaluation batches of 16
# of the 61 users: 4 batches, 2 per rank.
SMALL = ["--max-len", "8", "--depths=[1,2]", "--hidden=[16,32]", "--emb=[16,32]", "--heads", "2",
         "--router-dim", "8", "--router-heads", "2", "--batch-size", "25", "--progress", "false",
         "--threads", "1", "--dropout", "0", "--eval-every", "1", "--eval-batch-size", "16"]
RTOL = 1e-4  # float summation order differs between 1 and 2 ranks; nothing else may


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a test run under torchrun must not leak its own
    return {**env, **extra}


def _start_ranks(argv: list[str], world: int = 2, **extra: str) -> list[subprocess.Popen]:
    """One process per rank, with the environment torchrun gives each."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), *argv],
            env=_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world)
    ]


def _finish(ranks: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each rank; kills what still runs after ``timeout``."""
    results = []
    for process in ranks:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out, err))
    return results


def _check_ranks(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    assert all(status == 0 for status, _, _ in results), f"a rank failed: {results}"
    return results


def _run_ranks(argv: list[str], world: int = 2, **extra: str) -> list[tuple[int, str, str]]:
    return _check_ranks(_finish(_start_ranks(argv, world, **extra)))


def _history(run: Path) -> list[dict]:
    return json.loads((run / "last" / ckpt.STATE_FILE).read_text())["history"]


def _assert_same_run(one: Path, many: Path) -> None:
    """Losses per epoch (1e-4 relative), the sampled and validation routing (equal), the
    validation metrics (equal: the sharded evaluation gathers integer ranks) and the test
    metrics of metrics.json (equal) of a 1-process run and a distributed run."""
    a, b = _history(one), _history(many)
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "next_item", "guide", "uniform", "balance", "flops",
                    "expected_flops"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=RTOL), (key, ra["epoch"])
        assert rb["targets"] == ra["targets"] and rb["steps"] == ra["steps"]
        assert rb["sampled_histogram"] == ra["sampled_histogram"]
        assert rb.get("valid") == ra.get("valid")
        assert rb.get("valid_histogram") == ra.get("valid_histogram")
    test_a = json.loads((one / "metrics.json").read_text())
    test_b = json.loads((many / "metrics.json").read_text())
    assert test_b["metrics"] == test_a["metrics"]
    assert test_b["routing"]["histogram"] == test_a["routing"]["histogram"]


@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    # 61 users: the 61 validation users do not divide by 2 ranks.
    return write_csv_log(tmp_path_factory.mktemp("dist") / "log.csv", users=61, items=30)


# -- units ------------------------------------------------------------------------------------

def test_share_covers_every_item_once_without_padding() -> None:
    for total in (0, 1, 2, 3, 7, 61, 100):
        for world in (1, 2, 3, 8):
            parts = [range(total)[distributed.share(total, r, world)] for r in range(world)]
            assert [i for part in parts for i in part] == list(range(total))
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_batch_share_keeps_whole_batches() -> None:
    for total in (0, 1, 15, 16, 17, 61, 100):
        for batch in (1, 4, 16):
            for world in (1, 2, 3):
                parts = [range(total)[distributed.batch_share(total, batch, r, world)]
                         for r in range(world)]
                assert [i for part in parts for i in part] == list(range(total))
                for part in parts:  # whole batches: each share starts at a batch boundary
                    assert not part or part.start % batch == 0
                    assert not part or len(part) % batch == 0 or part.stop == total


def test_environment_is_read_from_torchrun_variables(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.environment() is None  # a plain process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.environment()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.environment() == distributed.DistEnvironment(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(distributed.DistributedError, match="RANK=2, WORLD_SIZE=2"):
        distributed.environment()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(distributed.DistributedError, match="RANK must be an int, got 'one'"):
        distributed.environment()


def test_a_routed_step_gives_every_parameter_a_gradient(log_file) -> None:
    """Why DDP runs routed steps without find_unused_parameters: every parameter gets a
    gradient in every routed step (a fixed-config step does not: it needs the search)."""
    config = load_config(None, {"max_len": 8, "depths": [1, 2], "hidden": [16, 32],
                                "emb": [16, 32], "heads": 2, "router_dim": 8, "router_heads": 2,
                                "batch_size": 3, "progress": False})
    data = load_dataset(log_file, **config.dataset_options())
    run = _Run(config, data, Path(os.devnull), lambda _: None)
    run.train_epoch(max_steps=1)
    # Adam's state exists exactly for the parameters that had a gradient.
    assert all(p in run.optimizer.state for p in run.model.parameters())
    config.fixed_config = 0
    fixed = _Run(config, data, Path(os.devnull), lambda _: None)
    fixed.train_epoch(max_steps=1)
    assert not all(p in fixed.optimizer.state for p in fixed.model.parameters())


# -- 1 process vs 2 ranks ------------------------------------------------------------------------

def test_torchrun_two_ranks_equal_one_process(tmp_path, log_file) -> None:
    """Through the real torchrun launcher, with the batch-level losses on (balance and FLOPs
    target: the global batch's mean is all-reduced) and a last batch of one window."""
    extra = ["--epochs", "2", "--balance-weight", "0.1", "--flops-target", "0.5"]
    one, many = tmp_path / "one", tmp_path / "many"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    launcher = subprocess.Popen(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "canet",
         "train", "--data", str(log_file), "--out", str(many), *SMALL, *extra],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # The one-process reference meanwhile, here (the ranks spend their first seconds starting).
    assert cli.main(["train", "--data", str(log_file), "--out", str(one), *SMALL, *extra]) == 0
    (status, stdout, stderr), = _finish([launcher], timeout=180)
    assert status == 0, stdout + stderr
    done = subprocess.CompletedProcess(launcher.args, status, stdout, stderr)
    _assert_same_run(one, many)
    # The run records how it ran; one log (rank 0's), and only rank 0 wrote the directory.
    state = json.loads((many / "last" / ckpt.STATE_FILE).read_text())
    assert (state["world_size"], state["backend"]) == (2, "gloo")
    assert all(record["world_size"] == 2 for record in state["history"])
    assert done.stdout.count("training CANet (routed) on 2 processes (gloo, global batch 25)") == 1
    assert done.stdout.count("test (best/)") == 1
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (many / "best" / ckpt.CALIBRATION_FILE).is_file()


def test_fixed_config_two_ranks_equal_one_process(tmp_path, log_file) -> None:
    """A fixed sub-network (a slice of the supernet: DDP searches for unused parameters); a
    negative seed (the ranks' dropout streams derive from it)."""
    extra = ["--epochs", "2", "--fixed-config", "2", "--seed", "-3"]
    one, many = tmp_path / "one", tmp_path / "many"
    ranks = _start_ranks(["train", "--data", str(log_file), "--out", str(many), *SMALL, *extra])
    assert cli.main(["train", "--data", str(log_file), "--out", str(one), *SMALL, *extra]) == 0
    _check_ranks(_finish(ranks))
    _assert_same_run(one, many)


@pytest.mark.skipif(not ML100K.exists(), reason=f"needs {ML100K} (the shared data)")
def test_ml100k_two_ranks_equal_one_process(tmp_path) -> None:
    args = ["--data", str(ML100K), *SMALL, "--max-len", "10", "--batch-size", "512",
            "--epochs", "2", "--eval-every", "2", "--calibration-budgets=[]"]
    one, many = tmp_path / "one", tmp_path / "many"
    ranks = _start_ranks(["train", "--out", str(many), *args])
    assert cli.main(["train", "--out", str(one), *args]) == 0
    _check_ranks(_finish(ranks))
    _assert_same_run(one, many)


# -- resume and failures ---------------------------------------------------------------------

def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "last" / ckpt.MODEL_FILE)


def test_resume_continues_a_distributed_run_bitwise(tmp_path, log_file) -> None:
    """2 ranks, with dropout (each rank draws its own masks): 3 epochs straight equal 2 epochs
    then --resume to 3, bit for bit (weights, losses, validation); the resume starts from an
    interrupted save (last/ moved aside, as a crash between a save's two renames leaves it):
    rank 0 restores it under the lock while the other ranks read it where it is."""
    args = ["--data", str(log_file), *SMALL, "--dropout", "0.1", "--calibration-budgets=[]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = _start_ranks(["train", "--out", str(straight), *args, "--epochs", "3"])
    second = _start_ranks(["train", "--out", str(resumed), *args, "--epochs", "2"])
    for status, out, err in _finish(first) + _finish(second):
        assert status == 0, out + err
    (resumed / "last").rename(resumed / ".last.old-12345")
    _run_ranks(["train", "--resume", str(resumed), "--data", str(log_file), "--epochs", "3"])
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("train_seconds", "steps_per_second", "targets_per_second")
    clean = [[{k: v for k, v in r.items() if k not in strip} for r in _history(run)]
             for run in (straight, resumed)]
    assert clean[0] == clean[1]


def test_a_failing_rank_stops_the_job_with_its_error_shown_once(tmp_path, log_file) -> None:
    started = time.monotonic()
    results = _finish(_start_ranks(
        ["train", "--data", str(log_file), "--out", str(tmp_path / "r"), *SMALL, "--epochs", "3"],
        CANET_TEST_FAIL="raise",
    ), timeout=90)
    assert time.monotonic() - started < 90
    (status0, _, err0), (status1, _, err1) = results
    assert status1 == 2 and err1.strip() == "canet: error: log.csv:7: a bad batch on purpose"
    assert status0 == 2 and "bad batch" not in err0  # shown once, by the rank that had it
    assert err0.strip().startswith("canet: error: rank 0 stopped: a collective with the other "
                                   "ranks failed") and "Traceback" not in err0
    # Rank 0 saved epoch 1 (the last good state) and nothing half-written.
    assert _history(tmp_path / "r")[-1]["epoch"] == 1


def test_a_silent_rank_stops_the_job_within_the_timeout(tmp_path, log_file) -> None:
    ranks = _start_ranks(
        ["train", "--data", str(log_file), "--out", str(tmp_path / "r"), *SMALL, "--epochs", "3",
         "--dist-timeout", "4"],
        CANET_TEST_FAIL="hang",
    )
    started = time.monotonic()
    status0, _, err0 = _finish(ranks[:1], timeout=60)[0]
    waited = time.monotonic() - started
    ranks[1].kill()  # torchrun would stop it once rank 0 exits
    _finish(ranks[1:])
    assert status0 == 2 and waited < 60, err0
    assert "rank 0 stopped" in err0 and "Timed out" in err0 and "Traceback" not in err0


def test_an_error_of_every_rank_is_shown_once(tmp_path, log_file) -> None:
    """A check every rank fails alike once the ranks are connected (a calibration budget below
    the cheapest sub-network): rank 0 prints it, the others nothing."""
    results = _finish(_start_ranks(
        ["train", "--data", str(log_file), "--out", str(tmp_path / "r"), *SMALL,
         "--calibration-budgets=[0.001]"]
    ), timeout=90)
    assert [status for status, _, _ in results] == [2, 2]
    errors = [err.strip() for _, _, err in results]
    assert errors[0].startswith("canet: error: ") and "0.001" in errors[0], errors
    assert errors[1] == ""


def test_a_config_error_is_shown_once(tmp_path, log_file) -> None:
    results = _finish(_start_ranks(
        ["train", "--data", str(log_file), "--out", str(tmp_path / "r"), "--lrate", "1"]
    ), timeout=60)
    errors = [err.strip() for _, _, err in results]
    assert [status for status, _, _ in results] == [2, 2]
    assert errors[0].startswith("canet: error: ") and "lrate" in errors[0]
    assert errors[1] == ""
    assert not (tmp_path / "r").exists()

