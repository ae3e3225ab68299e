"""Tests for the canet command: exit status 2 and one-line messages for every bad input,
the train -> evaluate -> recommend path, bench passthrough and the quick demo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TINY_ARGS,
    cli_fails,  # tests/ is on sys.path
    train_tiny_run,
)
from helpers import write_csv_log as _write_log

from canet import cli

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = _write_log(root / "log.csv")
    train_tiny_run(data, root / "run")
    return root, data


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "canet", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_subprocess_missing_file_and_unknown_key(tmp_path) -> None:
    missing = tmp_path / "nope.inter"
    done = _run_module("train", "--data", str(missing), "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"canet: error: {missing}: file not found"
    log = _write_log(tmp_path / "log.csv")
    done = _run_module("train", "--data", str(log), "--out", str(tmp_path / "r"), "--lrate=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown config key(s) 'lrate'; valid keys:" in done.stderr


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", "", "file is empty"),
        ("weird.txt", "a b c\n", ":1: cannot detect the format"),
        ("bad.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n",
         ":3: expected 3 tab-separated fields"),
        ("time.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnoon\n",
         ":2: timestamp 'noon' is not a number"),
        ("nouser.csv", "uid,item_id,timestamp\n1,2,3\n", ":1: header has no user column"),
        ("short.csv", "user_id,item_id\n1,2\n1,3\n2,2\n", "no user has at least 3 interactions"),
    ],
)
def test_bad_data_files(tmp_path, capsys, name, content, expected) -> None:
    path = tmp_path / name
    path.write_text(content)
    message = cli_fails(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "r")])
    assert str(path) in message and expected in message


def test_bad_config_values(tmp_path, capsys) -> None:
    log = _write_log(tmp_path / "log.csv")
    base = ["train", "--data", str(log), "--out", str(tmp_path / "r")]
    message = cli_fails(capsys, [*base, "--fixed-config", "99"])
    assert "fixed_config id must be in [0, 35]" in message
    assert "'epochs' expects int" in cli_fails(capsys, [*base, "--epochs=many"])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 2\nbogus: 1\n")
    message = cli_fails(capsys, [*base, "--config", str(cfg)])
    assert f"{cfg}: unknown config key(s) 'bogus'" in message


@pytest.mark.parametrize("device", ["cuda", "meta", "nonsense"])
def test_bad_device_is_refused_before_anything_is_created(tmp_path, capsys, device) -> None:
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    log = _write_log(tmp_path / "log.csv")
    message = cli_fails(capsys, ["train", "--data", str(log), "--out", str(tmp_path / "r"),
                             "--device", device])
    assert f"'{device}'" in message
    assert not (tmp_path / "r").exists()


def test_bad_checkpoints(trained, tmp_path, capsys) -> None:
    root, log = trained
    broken = tmp_path / "broken"
    shutil.copytree(root / "run" / "best", broken)
    (broken / "optimizer.pt").unlink()
    (broken / "vocab.json").unlink()
    message = cli_fails(capsys, ["evaluate", str(broken), "--data", str(log)])
    assert f"{broken / 'vocab.json'}: missing" in message
    # A model.safetensors from another model dropped into this checkpoint.
    other_log = _write_log(tmp_path / "other.csv", users=30, items=25, seed=5)
    train_tiny_run(other_log, tmp_path / "other")
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "run" / "best", mixed)
    shutil.copy(tmp_path / "other" / "best" / "model.safetensors", mixed / "model.safetensors")
    message = cli_fails(capsys, ["evaluate", str(mixed), "--data", str(log)])
    assert str(mixed / "model.safetensors") in message and "num_items" in message
    # Evaluating on data the model was not trained on.
    message = cli_fails(capsys, ["evaluate", str(root / "run"), "--data", str(other_log)])
    assert str(other_log) in message
    assert "not found" in cli_fails(capsys, ["recommend", str(tmp_path / "nowhere"), "--input",
                                         str(log), "--output", str(tmp_path / "o.csv")])


def test_usage_errors_are_one_line_too(capsys) -> None:
    assert "required: --data" in cli_fails(capsys, ["train", "--out", "x"])
    assert "invalid choice" in cli_fails(capsys, ["frobnicate"])


def test_evaluate_model_and_engine_agree(trained, tmp_path, capsys) -> None:
    root, log = trained
    run = root / "run"
    assert cli.main(["evaluate", str(run), "--data", str(log), "--output",
                     str(tmp_path / "m.json")]) == 0
    assert cli.main(["evaluate", str(run), "--data", str(log), "--backend", "torch",
                     "--output", str(tmp_path / "e.json")]) == 0
    by_model = json.loads((tmp_path / "m.json").read_text())
    by_engine = json.loads((tmp_path / "e.json").read_text())
    assert by_model["metrics"] == by_engine["metrics"] and by_engine["backend"] == "torch"
    assert by_model["protocol"]["padding_excluded"] is True
    assert (run / "metrics.json").exists()  # written by train (test split of best/)
    assert "ndcg@10" in capsys.readouterr().out
    assert by_model["standard_errors"].keys() == by_model["metrics"].keys()


def test_evaluate_writes_per_user_ranks(trained, tmp_path, capsys) -> None:
    root, log = trained
    ranks_path = tmp_path / "ranks.csv"
    assert cli.main(["evaluate", str(root / "run"), "--data", str(log), "--output",
                     str(tmp_path / "m.json"), "--ranks-out", str(ranks_path)]) == 0
    assert str(ranks_path) in capsys.readouterr().out
    with ranks_path.open() as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert len(rows) == metrics["num_users"] and "per_user" not in metrics
    ranks = np.array([int(row["rank"]) for row in rows])
    assert ranks.min() >= 1  # 1-based
    hit = (ranks <= 10).mean()
    assert metrics["metrics"]["hit@10"] == pytest.approx(hit, abs=1e-12)
    # External ids: each user's target is its latest item in the log.
    with log.open() as handle:
        events = sorted(csv.DictReader(handle), key=lambda r: int(r["timestamp"]))
    latest = {r["user_id"]: r["item_id"] for r in events}
    assert {row["user_id"]: row["item_id"] for row in rows}.items() <= latest.items()


def test_recommend_csv_and_unknown_items(trained, tmp_path, capsys) -> None:
    root, _ = trained
    histories = tmp_path / "h.json"
    histories.write_text(json.dumps({"alice": ["i1", "i2", "zzz"], "bob": ["i4"],
                                     "ghost": ["nope"]}))
    output = tmp_path / "recs.csv"
    assert cli.main(["recommend", str(root / "run"), "--input", str(histories), "-k", "3",
                     "--output", str(output), "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert "user alice: 1 unknown item(s) ignored: zzz" in err
    assert "user ghost: no known item" in err
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["user_id", "item_id", "score", "rank"]
    assert [(r["user_id"], r["rank"]) for r in rows] == [
        ("alice", "1"), ("alice", "2"), ("alice", "3"), ("bob", "1"), ("bob", "2"), ("bob", "3")
    ]
    assert not {"i1", "i2"} & {r["item_id"] for r in rows if r["user_id"] == "alice"}


def test_recommend_never_overwrites_silently(trained, tmp_path, capsys) -> None:
    root, _ = trained
    histories = tmp_path / "h.json"
    histories.write_text(json.dumps({"alice": ["i1", "i2"]}))
    before = histories.read_bytes()
    base = ["recommend", str(root / "run"), "--input", str(histories), "-k", "2",
            "--backend", "torch"]
    # Output == input: refused always, --overwrite too, also through another spelling/a link.
    for spelled in (histories, tmp_path / "." / "h.json"):
        for extra in ([], ["--overwrite"]):
            message = cli_fails(capsys, [*base, "--output", str(spelled), *extra])
            assert "is the --input file" in message
    link = tmp_path / "link.json"
    link.symlink_to(histories)
    assert "is the --input file" in cli_fails(capsys, [*base, "--output", str(link), "--overwrite"])
    assert histories.read_bytes() == before
    # An existing output: refused without --overwrite, replaced with it.
    output = tmp_path / "recs.csv"
    output.write_text("keep me\n")
    message = cli_fails(capsys, [*base, "--output", str(output)])
    assert message == f"canet: error: {output}: already exists; pass --overwrite to replace it"
    assert output.read_text() == "keep me\n"
    assert cli.main([*base, "--output", str(output), "--overwrite"]) == 0
    assert output.read_text().startswith("user_id,item_id,score,rank")


def test_resume_through_the_cli(trained, tmp_path, capsys) -> None:
    root, log = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    assert cli.main(["train", "--data", str(log), "--resume", str(run), "--epochs", "2",
                     "--no-test"]) == 0
    assert "resumed" in capsys.readouterr().out
    message = cli_fails(
        capsys, ["train", "--data", str(log), "--resume", str(run), "--hidden=[8,32]"]
    )
    assert "changed architecture" in message and "hidden" in message
    assert "already holds a training run" in cli_fails(
        capsys, ["train", "--data", str(log), "--out", str(run), *TINY_ARGS]
    )


def test_bench_passthrough(monkeypatch, capsys) -> None:
    seen = {}
    fake = types.ModuleType("canet.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "canet.bench", fake)
    assert cli.main(["bench", "--quick", "-x"]) == 0
    assert seen["argv"] == ["--quick", "-x"]
    monkeypatch.setitem(sys.modules, "canet.bench", None)
    assert cli.main(["bench"]) == 2
    assert "'bench' is not available" in capsys.readouterr().err


def test_demo_quick_end_to_end(tmp_path, capsys) -> None:
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--backend", "torch",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CANet demo summary" in out and "speedup" in out and "FLOPs reduction" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["canet"]) >= {"ndcg@10", "recall@10"}
    assert sum(summary["routing_histogram"]) == summary["num_users"]
    assert (tmp_path / "canet" / "best" / "model.safetensors").exists()
    assert (tmp_path / "full" / "metrics.json").exists()


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    message = cli_fails(capsys, ["demo", "--quick", "--out", str(blocker / "run")])
    assert str(blocker) in message


def test_compare_two_rank_files(trained, tmp_path, capsys) -> None:
    root, log = trained
    ranks = tmp_path / "a.csv"
    assert cli.main(["evaluate", str(root / "run"), "--data", str(log), "--output",
                     str(tmp_path / "m.json"), "--ranks-out", str(ranks)]) == 0
    rows = list(csv.reader(ranks.open()))
    # B: the same users with every target pushed 5 places down.
    worse = tmp_path / "b.csv"
    with worse.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0]] + [[u, i, int(r) + 5] for u, i, r in rows[1:]])
    capsys.readouterr()
    assert cli.main(["compare", str(ranks), "--against", str(worse), "--metric", "recall@20",
                     "--resamples", "300", "--output", str(tmp_path / "c.json")]) == 0
    assert "95% paired bootstrap interval" in capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    a = np.array([int(r) for _, _, r in rows[1:]])
    assert result["users"] == len(a)
    assert result["difference"] == pytest.approx((a <= 20).mean() - (a + 5 <= 20).mean())
    assert result["difference"] >= 0 and result["low"] <= result["difference"] <= result["high"]
    # Several runs per side: each user's metric is averaged over a side's runs.
    assert cli.main(["compare", str(ranks), str(worse), "--against", str(worse), "--metric",
                     "recall@20", "--resamples", "300", "--output", str(tmp_path / "c2.json")]) == 0
    two = json.loads((tmp_path / "c2.json").read_text())
    assert (two["runs_a"], two["runs_b"]) == (2, 1)
    assert two["mean_a"] == pytest.approx(((a <= 20).mean() + (a + 5 <= 20).mean()) / 2)
    assert two["difference"] == pytest.approx(result["difference"] / 2)
    # Mismatched evaluations are refused with one line naming the file.
    other = tmp_path / "other.csv"
    with other.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows[:-1])
    assert "users differ" in cli_fails(capsys, ["compare", str(ranks), "--against", str(other)])
    assert "users differ" in cli_fails(capsys, ["compare", str(ranks), str(other), "--against",
                                            str(ranks)])
    moved = tmp_path / "moved.csv"
    with moved.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], [rows[1][0], "elsewhere", 1]] + rows[2:])
    assert "has target 'elsewhere'" in cli_fails(capsys, ["compare", str(ranks), "--against",
                                                      str(moved)])
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n")
    assert f"{bad}:1: expected the header" in cli_fails(capsys, ["compare", str(bad), "--against",
                                                             str(ranks)])
    assert "no such file" in cli_fails(capsys, ["compare", str(tmp_path / "nope.csv"), "--against",
                                            str(ranks)])
    assert "metric must be one of" in cli_fails(capsys, ["compare", str(ranks), "--against",
                                                     str(ranks), "--metric", "auc"])
    assert "--against" in cli_fails(capsys, ["compare", str(ranks)])
    # A non-UTF-8 file is named (before: a bare UnicodeDecodeError message).
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"user_id,item_id,rank\n1,\xe9t\xe9,3\n")
    message = cli_fails(capsys, ["compare", str(latin), "--against", str(ranks)])
    assert f"{latin}: not UTF-8 text (byte 0xe9)" in message
    assert f"{tmp_path}: cannot read" in cli_fails(capsys, ["compare", str(tmp_path), "--against",
                                                        str(ranks)])


def test_help_states_the_default_backends(capsys) -> None:
    for command, default in (("evaluate", "'model' (the default"), ("recommend", "auto (the "
                                                                                  "default)")):
        assert cli.main([command, "--help"]) == 0
        assert default in " ".join(capsys.readouterr().out.split())
