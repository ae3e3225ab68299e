"""Tests for serve-time budget calibration (canet.calibrate), its calibration.json in
checkpoints, training's calibration of best/, ``canet calibrate`` and ``--budget`` on the
command line and in Recommender."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import cli_fails, make_model, write_csv_log  # tests/ is on sys.path

import canet.calibrate as calibrate_module
from canet import Engine, Recommender, backends, cli
from canet.budget import DEFAULT_BUDGETS, BudgetError, RoutingPenalty
from canet.calibrate import calibrate, resolve_budgets
from canet.checkpoint import (
    CALIBRATION_FILE,
    LOCK_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_checkpoint,
    save_checkpoint,
    write_calibration,
)
from canet.config import config_from_dict
from canet.data import build_dataset, load_dataset, synthetic_log
from canet.errors import CheckpointError, ConfigError
from canet.evaluate import evaluate
from canet.flops import flops
from canet.space import RoutingSpace
from canet.train import train

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "ml100k-tiny-b98b0d9"  # saved before calibration existed
SPACE = RoutingSpace((1, 2), (8, 16), (8, 16), 2)
MAX_LEN = 8
TINY = {"max_len": MAX_LEN, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 1, "batch_size": 32, "progress": False,
        "threads": 1}
TINY_ARGS = ["--max-len", "8", "--depths=[1,2]", "--hidden=[8,16]", "--emb=[8,16]",
             "--heads", "2", "--router-dim", "8", "--router-heads", "2", "--epochs", "1",
             "--batch-size", "32", "--progress", "false", "--threads", "1"]
BATCH = 13  # calibration batches that do not divide the number of users
AVAILABLE = [name for name, why in backends.availability("cpu").items() if why is None]


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data():
    return build_dataset(synthetic_log(57, 23, 4, seq_len=(5, 14)), MAX_LEN)


@pytest.fixture(scope="module")
def model(data):
    """Random weights: a router whose argmax spreads users over many configs."""
    return make_model(torch.float32, seed=3, num_items=data.num_items, max_len=MAX_LEN,
                      space=SPACE)


@pytest.fixture(scope="module")
def table(model, data):
    return calibrate(model, data, DEFAULT_BUDGETS, batch_size=BATCH)


def _fractions(model) -> list[float]:
    """Each config's FLOPs over the largest's, from canet.flops directly."""
    largest = flops(SPACE.configs[SPACE.largest_id], MAX_LEN, model.num_items)
    return [flops(c, MAX_LEN, model.num_items) / largest for c in SPACE.configs]


def _routed(model, data, penalty=None, split="valid") -> torch.Tensor:
    return torch.cat([model.route(seqs, penalty)
                      for _, seqs, _ in data.eval_batches(split, BATCH)])


def _mean_fraction(model, ids: torch.Tensor) -> float:
    fractions = _fractions(model)
    return math.fsum(fractions[i] for i in ids.tolist()) / len(ids)


# -- calibration ----------------------------------------------------------------------------


def test_each_budget_is_met_on_the_calibration_users(model, data, table) -> None:
    smallest = min(_fractions(model))
    assert table.smallest_fraction == pytest.approx(smallest, abs=1e-12)
    assert table.budgets == [b for b in DEFAULT_BUDGETS if b >= smallest]
    assert table.split == "valid" and table.num_users == len(_routed(model, data))
    for point in table.points:
        achieved = _mean_fraction(model, _routed(model, data, table.penalty(point.budget)))
        assert achieved <= point.budget + 1e-12, point
        assert achieved == pytest.approx(point.flops_fraction, abs=1e-12)
    # The lower end: lam_smallest routes every user to the cheapest config.
    cheapest = _routed(model, data, RoutingPenalty(table.lam_smallest))
    assert _mean_fraction(model, cheapest) == pytest.approx(smallest, abs=1e-12)


def test_budgets_are_monotone(model, data) -> None:
    smallest = min(_fractions(model))
    dense = [round(smallest + i * (1 - smallest) / 23, 6) for i in range(1, 23)]
    table = calibrate(model, data, dense, batch_size=BATCH)
    flops_, lams = [p.flops_fraction for p in table.points], [p.lam for p in table.points]
    assert flops_ == sorted(flops_), "a larger budget lowered the FLOPs"
    assert lams == sorted(lams, reverse=True), "a larger budget raised lambda"
    assert len(set(lams)) > 3  # the budgets bind: the test says something


def test_budget_one_is_the_routers_own_routing(model, data, table) -> None:
    assert table.points[-1].budget == 1.0 and table.points[-1].lam == 0.0
    penalty = table.penalty(1.0)
    assert penalty.is_identity
    assert torch.equal(_routed(model, data, penalty), _routed(model, data))
    assert table.points[-1].flops_fraction == pytest.approx(
        _mean_fraction(model, _routed(model, data)), abs=1e-12)


def test_a_budget_between_two_calibrated_ones_is_kept(model, data, table) -> None:
    pairs = [(a, b) for a, b in zip(table.points, table.points[1:], strict=False)
             if a.lam != b.lam]
    assert pairs
    for low, high in pairs:
        middle = (low.budget + high.budget) / 2
        penalty = table.penalty(middle)
        assert high.lam <= penalty.lam <= low.lam
        achieved = _mean_fraction(model, _routed(model, data, penalty))
        assert low.flops_fraction - 1e-12 <= achieved <= middle + 1e-12


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("batch_size", [1, 7, 512])
def test_each_budget_is_met_through_every_backend_and_batching(model, data, table, backend,
                                                                batch_size) -> None:
    """The calibrated penalties hold wherever the calibration users are served: a backend's
    router logits may differ from the model's by an ulp, and a calibrated penalty at a tie
    would then move a user back over the budget (calibrate_lambda keeps a margin)."""
    for point in table.points:
        engine = Engine(model, backend=backend, budget=point.budget, budget_table=table)
        ids = torch.cat([engine.route(seqs)
                         for _, seqs, _ in data.eval_batches("valid", batch_size)])
        assert _mean_fraction(model, ids) <= point.budget + 1e-12, (backend, point)


def test_a_float64_model_is_calibrated_on_its_own_logits(data) -> None:
    """Logits were rounded to float32 for calibration, so a float64 model's own routing could
    exceed a budget by a user."""
    model = make_model(torch.float64, seed=5, num_items=data.num_items, max_len=MAX_LEN,
                       space=SPACE)
    table = calibrate(model, data, DEFAULT_BUDGETS, batch_size=BATCH)
    for point in table.points:
        achieved = _mean_fraction(model, _routed(model, data, table.penalty(point.budget)))
        assert achieved <= point.budget + 1e-12, point
        assert achieved == pytest.approx(point.flops_fraction, abs=1e-12)


def test_ndcg_of_each_budget_is_evaluate_with_its_penalty(model, data, table, monkeypatch
                                                          ) -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["penalty"].lam)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "evaluate", counting)
    again = calibrate(model, data, DEFAULT_BUDGETS, batch_size=BATCH)
    assert again == table  # deterministic
    assert sorted(calls) == sorted({p.lam for p in table.points})  # one per distinct lambda
    for point in table.points:
        want = evaluate(model, data, "valid", penalty=RoutingPenalty(point.lam))
        assert point.ndcg10 == pytest.approx(want["metrics"]["ndcg@10"], rel=1e-12)


def test_calibration_restores_the_models_mode_and_ignores_dropout(model, data, table) -> None:
    model.train()
    try:
        assert calibrate(model, data, DEFAULT_BUDGETS, batch_size=BATCH) == table
        assert model.training
    finally:
        model.eval()


def test_one_user_and_the_test_split(model) -> None:
    one = build_dataset(synthetic_log(1, 23, 9, seq_len=(6, 6)), MAX_LEN)
    single = make_model(torch.float32, seed=3, num_items=one.num_items, max_len=MAX_LEN,
                        space=SPACE)
    table = calibrate(single, one, [0.5, 1.0], split="test")
    assert table.num_users == 1 and table.split == "test"
    for point in table.points:
        achieved = _mean_fraction(single, _routed(single, one, table.penalty(point.budget),
                                                  "test"))
        assert achieved <= point.budget + 1e-12


@pytest.mark.parametrize("budgets", [[0.3, 0.3], [0.0], [-0.1], [1.5], [float("nan")],
                                     ["abc"], [0.5, 0.50]])
def test_bad_budget_lists_are_refused(model, data, budgets) -> None:
    with pytest.raises(BudgetError) as error:
        calibrate(model, data, budgets)
    assert "\n" not in str(error.value)


def test_budgets_below_the_smallest_achievable(model, data) -> None:
    smallest = min(_fractions(model))
    below = smallest / 2
    with pytest.raises(BudgetError, match=f"smallest achievable budget is {smallest:.4f}"):
        calibrate(model, data, [below, 0.5])
    # The default list leaves them out silently; 1.0 is always there.
    assert resolve_budgets(DEFAULT_BUDGETS, 0.35) == (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert resolve_budgets([0.5], smallest) == (0.5, 1.0)
    assert resolve_budgets([], smallest) == (1.0,)


# -- checkpoints ----------------------------------------------------------------------------


def _save(path, model, data, table=None):
    config = config_from_dict({**TINY, "router_dim": 32, "router_heads": 4})
    return save_checkpoint(path, model, config, data.vocab, {"epoch": 1}, {"optimizer": {}},
                           calibration=table)


def _restate(directory: Path) -> None:
    """Record calibration.json's current digest in trainer_state.json (a forged but
    self-consistent checkpoint, to reach the checks after the digest)."""
    state = json.loads((directory / STATE_FILE).read_text())
    state["files_sha256"][CALIBRATION_FILE] = hashlib.sha256(
        (directory / CALIBRATION_FILE).read_bytes()).hexdigest()
    (directory / STATE_FILE).write_text(json.dumps(state))


def test_a_saved_table_loads_with_the_checkpoint(tmp_path, model, data, table) -> None:
    _save(tmp_path / "ck", model, data, table)
    state = json.loads((tmp_path / "ck" / STATE_FILE).read_text())
    assert CALIBRATION_FILE in state["files_sha256"]
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.calibration == table and loaded.model.budget_table == table
    plain = _save(tmp_path / "plain", model, data)
    assert load_checkpoint(plain).calibration is None


def test_calibration_corruption_is_refused(tmp_path, model, data, table) -> None:
    ck = _save(tmp_path / "ck", model, data, table)
    path = ck / CALIBRATION_FILE
    text = path.read_text()
    path.write_text(text.replace('"lam"', '"lam" ', 1))  # edited bytes
    with pytest.raises(CheckpointError, match=f"{path}: corrupted"):
        load_checkpoint(ck)
    path.unlink()  # removed while listed
    with pytest.raises(CheckpointError, match="missing, but listed"):
        load_checkpoint(ck)
    plain = _save(tmp_path / "plain", model, data)
    (plain / CALIBRATION_FILE).write_text(text)  # added while unlisted
    with pytest.raises(CheckpointError, match="not listed"):
        load_checkpoint(plain)
    # Another model's table, recorded in the digests: its smallest budget gives it away.
    other = replace(table, smallest_fraction=table.smallest_fraction * 0.9)
    path.write_text(other.to_json())
    _restate(ck)
    with pytest.raises(CheckpointError, match="belongs to another model"):
        load_checkpoint(ck)
    # Not a table at all, recorded in the digests.
    path.write_text('{"version": 1}')
    _restate(ck)
    with pytest.raises(CheckpointError, match="invalid calibration table"):
        load_checkpoint(ck)


def test_a_refused_table_leaves_the_callers_model_unchanged(tmp_path, model, data, table
                                                           ) -> None:
    ck = _save(tmp_path / "ck", model, data, table)
    (ck / CALIBRATION_FILE).write_text(
        replace(table, smallest_fraction=0.5).to_json())
    _restate(ck)
    other = make_model(torch.float32, seed=8, num_items=data.num_items, max_len=MAX_LEN,
                       space=SPACE)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(ck, model=other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    assert other.budget_table is None


def test_write_calibration_adds_and_replaces_the_table(tmp_path, model, data, table) -> None:
    ck = _save(tmp_path / "ck", model, data)
    others = {name: (ck / name).read_bytes() for name in os.listdir(ck) if name != STATE_FILE}
    write_calibration(ck, table)
    assert load_checkpoint(ck).calibration == table
    assert {name: (ck / name).read_bytes() for name in others} == others  # the rest unchanged
    smaller = calibrate(model, data, [0.5], batch_size=BATCH)
    write_calibration(ck, smaller)
    assert load_checkpoint(ck).calibration == smaller
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    with pytest.raises(CheckpointError, match="belongs to another model"):
        write_calibration(ck, replace(table, smallest_fraction=0.5))
    digest = json.loads((ck / STATE_FILE).read_text())["files_sha256"][MODEL_FILE]
    with pytest.raises(CheckpointError, match="model changed"):
        write_calibration(ck, table, model_sha256="0" * 64)
    write_calibration(ck, table, model_sha256=digest)
    # A corrupted file is not blessed with a new state.
    (ck / "vocab.json").write_text((ck / "vocab.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="corrupted"):
        write_calibration(ck, smaller)
    with pytest.raises(CheckpointError, match="vocab.json: corrupted"):
        load_checkpoint(ck)


def test_a_checkpoint_from_before_calibration_loads_and_refuses_budgets(tmp_path, capsys
                                                                       ) -> None:
    loaded = load_checkpoint(FIXTURE)
    assert loaded.calibration is None and loaded.model.budget_table is None
    with pytest.raises(BudgetError, match="run `canet calibrate"):
        Recommender.from_pretrained(FIXTURE, backend="torch", budget=0.3)
    # Budget 1.0 and a plain cap need no table.
    assert Recommender.from_pretrained(FIXTURE, backend="torch", budget=1.0).engine.penalty is None
    capped = Recommender.from_pretrained(FIXTURE, backend="torch", max_flops=0.5)
    assert capped.engine.penalty == RoutingPenalty(0.0, 0.5)
    message = cli_fails(capsys, ["evaluate", str(FIXTURE), "--data", str(tmp_path / "log.csv"),
                             "--budget", "0.3"])
    assert "run `canet calibrate" in message
    (tmp_path / "h.json").write_text(json.dumps({"a": ["50", "172"]}))
    message = cli_fails(capsys, ["recommend", str(FIXTURE), "--input", str(tmp_path / "h.json"),
                             "--output", str(tmp_path / "out.csv"), "--budget", "0.3"])
    assert "run `canet calibrate" in message
    assert not (tmp_path / "out.csv").exists()


# -- training, the command line, Recommender ------------------------------------------------



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A routed run trained by train() (which calibrates best/) and its CSV log."""
    root = tmp_path_factory.mktemp("calibrated")
    log = write_csv_log(root / "log.csv", users=45, items=20, seed=2)
    lines: list[str] = []
    data = load_dataset(log, **config_from_dict(TINY).dataset_options())
    result = train(config_from_dict(TINY), data, root / "run", log=lines.append)
    return {"root": root, "log": log, "run": root / "run", "result": result, "lines": lines,
            "data": data}


def test_training_calibrates_best(run) -> None:
    loaded = load_checkpoint(run["run"])
    table = loaded.calibration
    assert table is not None and table == run["result"].calibration
    assert table.split == "valid" and table.budgets[-1] == 1.0
    assert table == calibrate(loaded.model, run["data"], DEFAULT_BUDGETS)  # reproducible
    budget_lines = [line for line in run["lines"] if line.strip().startswith("budget ")]
    assert len(budget_lines) == len(table.points)
    assert budget_lines[-1].strip().startswith("budget 1.00: lambda 0, FLOPs ")
    assert "(valid), ndcg@10 " in budget_lines[0]
    assert not (run["run"] / "last" / CALIBRATION_FILE).exists()


def test_calibration_budgets_config(tmp_path, run) -> None:
    skipped = train(config_from_dict({**TINY, "calibration_budgets": []}), run["data"],
                    tmp_path / "none", log=_quiet)
    assert skipped.calibration is None
    assert not (tmp_path / "none" / "best" / CALIBRATION_FILE).exists()
    for bad, match in (([0.5, 0.5], "distinct"), ([1.5], r"calibration_budgets\[0\]"),
                       ([0.0], r"\(0, 1\]")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**TINY, "calibration_budgets": bad})
    # Below this model's smallest achievable budget: refused before training, not after.
    with pytest.raises(BudgetError, match="smallest achievable"):
        train(config_from_dict({**TINY, "calibration_budgets": [0.001]}), run["data"],
              tmp_path / "low", log=_quiet)
    assert not (tmp_path / "low" / "best").exists()


def test_canet_calibrate_rewrites_the_table(run, tmp_path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    capsys.readouterr()
    assert cli.main(["calibrate", str(copy), "--data", str(run["log"]), "--budgets",
                     "0.7,0.55", "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    table = load_checkpoint(copy).calibration
    assert table.budgets == [0.55, 0.7, 1.0]
    assert "budget 0.55: lambda" in out and str(copy / "best" / CALIBRATION_FILE) in out
    assert table == calibrate(load_checkpoint(copy).model, run["data"], [0.55, 0.7])


def test_evaluate_and_recommend_with_a_budget(run, tmp_path, capsys) -> None:
    loaded = load_checkpoint(run["run"])
    budget = loaded.calibration.points[0].budget
    output = tmp_path / "m.json"
    capsys.readouterr()
    assert cli.main(["evaluate", str(run["run"]), "--data", str(run["log"]), "--split", "valid",
                     "--budget", f"{budget:g}", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(output.read_text())
    want = evaluate(loaded.model, run["data"], "valid",
                    penalty=loaded.calibration.penalty(budget))
    assert metrics["routing"]["histogram"] == want["routing"]["histogram"]
    assert metrics["flops"]["fraction_of_largest"] <= budget + 1e-12
    assert f"budget {budget:g}: lambda" in out and "FLOPs achieved" in out
    # The default metrics file names the budget.
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    assert cli.main(["evaluate", str(copy), "--data", str(run["log"]), "--budget", "0.5"]) == 0
    assert (copy / "metrics_budget-0.5.json").exists()
    # recommend goes through Recommender with the same routing.
    tokens = loaded.vocab.item_tokens(list(range(1, 10)))
    histories = {"u1": tokens[:3], "u2": tokens[3:4], "u3": tokens[4:]}
    (tmp_path / "h.json").write_text(json.dumps(histories))
    assert cli.main(["recommend", str(run["run"]), "--input", str(tmp_path / "h.json"),
                     "--output", str(tmp_path / "r.csv"), "--budget", f"{budget:g}",
                     "--backend", "torch"]) == 0
    assert f"budget {budget:g}: FLOPs" in capsys.readouterr().out
    rec = Recommender.from_pretrained(run["run"], backend="torch", budget=budget)
    rec.recommend(histories, k=3)
    seqs = torch.zeros(3, MAX_LEN, dtype=torch.int64)
    for row, history in enumerate(histories.values()):
        ids, _ = rec.vocab.item_ids(history)
        seqs[row, MAX_LEN - len(ids):] = torch.from_numpy(ids)
    want_ids = rec.model.route(seqs, loaded.calibration.penalty(budget))
    assert list(rec.last_config_ids.values()) == want_ids.tolist()
    assert rec.last_flops_fraction == pytest.approx(_mean_fraction(rec.model, want_ids))


def test_a_fixed_config_run_has_nothing_to_calibrate(run, tmp_path, capsys) -> None:
    fixed = train(config_from_dict({**TINY, "fixed_config": "largest"}), run["data"],
                  tmp_path / "fixed", log=_quiet)
    assert fixed.calibration is None
    assert not (tmp_path / "fixed" / "best" / CALIBRATION_FILE).exists()
    for argv in (["calibrate", str(tmp_path / "fixed"), "--data", str(run["log"])],
                 ["evaluate", str(tmp_path / "fixed"), "--data", str(run["log"]),
                  "--budget", "0.5"]):
        assert "fixed-config run" in cli_fails(capsys, argv)
    with pytest.raises(BudgetError, match="fixed-config run"):
        Recommender.from_pretrained(tmp_path / "fixed", backend="torch", max_flops=0.5)


def test_writing_is_refused_while_another_process_holds_the_run(run, tmp_path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    table = load_checkpoint(copy).calibration
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from canet.checkpoint import lock_run_dir\n"
         "with lock_run_dir(sys.argv[1]):\n    time.sleep(60)", str(copy)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while (copy / LOCK_FILE).read_text().strip() != str(holder.pid):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        before = (copy / "best" / STATE_FILE).read_bytes()
        with pytest.raises(CheckpointError, match=f"in use by pid {holder.pid}"):
            write_calibration(copy / "best", table)
        message = cli_fails(capsys, ["calibrate", str(copy), "--data", str(run["log"])])
        assert f"in use by pid {holder.pid}" in message
        assert (copy / "best" / STATE_FILE).read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert write_calibration(copy, table) == copy / "best"  # free again; a run dir -> best/
