"""Tests for canet.pareto and ``canet pareto``: on a tiny trained run, every budget and config in
the report, fixed-config rows equal to plain evaluations, budget FLOPs equal to an independent
recomputation of the routing, comparisons equal to paired_difference with verdicts that follow
their intervals, the Markdown tables, the writers, and one-line exit-2 errors for bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_fails, write_csv_log  # tests/ is on sys.path

from canet import cli
from canet.budget import BudgetError
from canet.checkpoint import load_checkpoint
from canet.config import config_from_dict
from canet.data import build_dataset, load_dataset, synthetic_log
from canet.errors import CanetError
from canet.evaluate import evaluate
from canet.metrics import paired_difference
from canet.pareto import (
    AgainstRun,
    check_budgets,
    pareto_report,
    render_markdown,
    verdict,
    write_report,
)
from canet.train import train

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 5, "batch_size": 32, "progress": False,
        "lr": 3e-3, "threads": 1}
CALIBRATED = "0.2,0.35,0.6"  # canet calibrate always adds 1
BUDGETS = [0.2, 0.35, 0.6, 1.0]
SHUFFLES = 2


def _quiet(_: str) -> None:
    pass


def _train(root: Path, name: str, log: Path, **overrides) -> Path:
    """A tiny run, not calibrated (``canet calibrate`` does it where a test needs it)."""
    config = config_from_dict({**TINY, "calibration_budgets": [], **overrides})
    data = load_dataset(log, **config.dataset_options())
    train(config, data, root / name, log=_quiet)
    return root / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    log = write_csv_log(root / "log.csv", users=200, items=60)
    run = _train(root, "run", log)
    assert cli.main(["calibrate", str(run), "--data", str(log), "--budgets", CALIBRATED]) == 0
    loaded = load_checkpoint(run)
    data = load_dataset(log, **loaded.config.dataset_options())
    model, table = loaded.model, loaded.model.budget_table
    assert table.budgets == BUDGETS
    broken = copy.deepcopy(model)  # every ranking reversed: as wrong as a model can be
    with torch.no_grad():
        broken.supernet.out.weight.neg_()
        broken.supernet.out.bias.neg_()
    messages: list[str] = []
    report = pareto_report(
        model, data, table, shuffles=SHUFFLES, backend="model",
        against=[("broken", broken, None), ("itself", model, None),
                 ("largest", model, model.space.largest_id)],
        run={"path": str(run)}, log=messages.append,
    )
    return {"root": root, "log": log, "run": run, "model": model, "data": data,
            "table": table, "report": report, "messages": messages}


def test_every_budget_and_config_and_progress(trained) -> None:
    report, model = trained["report"], trained["model"]
    assert [row["budget"] for row in trained["report"]["budgets"]] == BUDGETS
    assert [row["budget"] for row in report["random"]] == BUDGETS
    assert [row["config_id"] for row in report["fixed"]] == list(range(model.space.n_configs))
    assert [(r["depth"], r["hidden"], r["emb"]) for r in report["fixed"]] == [
        (c.depth, c.hidden, c.emb) for c in model.space.configs]
    assert report["num_users"] == len(trained["data"].eval_users("test"))
    distinct = len({trained["table"].penalty(b).lam for b in BUDGETS})
    total = distinct * (1 + SHUFFLES) + model.space.n_configs + 3
    assert report["evaluations"] == total
    assert trained["messages"][0].startswith(f"pareto: {total} evaluations on test")
    progress = [m.split(" ")[1] for m in trained["messages"] if "/" in m.split(" ")[1]]
    assert progress == [f"{k}/{total}" for k in range(1, total + 1)]
    json.dumps(report)  # JSON-able as it is


def test_budgets_with_the_same_penalty_are_evaluated_once(trained) -> None:
    """Budgets at or above the router's own cost all get lambda 0 (identical routing): one
    evaluation (and one set of shuffles) serves them all, and their rows are identical."""
    model, data, table = trained["model"], trained["data"], trained["table"]
    flat = dataclasses.replace(  # every calibrated budget routes as the router does
        table, points=tuple(dataclasses.replace(p, lam=0.0) for p in table.points))
    messages: list[str] = []
    report = pareto_report(model, data, flat, budgets=[0.35, 0.6, 1.0], shuffles=SHUFFLES,
                           backend="model", log=messages.append)
    assert report["evaluations"] == (1 + SHUFFLES) + model.space.n_configs
    assert sum("its evaluations are reused" in m for m in messages) == 2
    plain = evaluate(model, data, "test")
    for row in report["budgets"]:
        assert row["lam"] == 0.0
        assert row["ndcg@10"] == plain["metrics"]["ndcg@10"]
        assert row["histogram"] == plain["routing"]["histogram"]
    rows = [{k: v for k, v in r.items() if k != "budget"} for r in report["random"]]
    assert rows[0] == rows[1] == rows[2]
    # Reused rows are compared like any other: one comparison set per budget.
    assert [c["budget"] for c in report["comparisons"] if c["kind"] == "random routing"] == [
        0.35, 0.6, 1.0]


def test_fixed_rows_equal_plain_evaluations(trained) -> None:
    model, data = trained["model"], trained["data"]
    for row in trained["report"]["fixed"]:
        plain = evaluate(model, data, "test", fixed_config_id=row["config_id"])
        assert row["metrics"] == plain["metrics"]
        assert row["standard_errors"] == plain["standard_errors"]
        assert row["flops_fraction"] == pytest.approx(
            model.flops_fractions[row["config_id"]], rel=1e-12)
        assert row["flops_fraction_with_router"] == row["flops_fraction"]


def test_budget_flops_equal_an_independent_recomputation(trained) -> None:
    model, data, table = trained["model"], trained["data"], trained["table"]
    router = model.flops_fractions  # fraction of the largest, router excluded
    report = trained["report"]
    fractions = []
    for row in report["budgets"]:
        penalty = table.penalty(row["budget"])
        ids = torch.cat([model.route(seqs, penalty)
                         for _, seqs, _ in data.eval_batches("test", 37)])
        expected = float(np.mean([router[i] for i in ids.tolist()]))
        assert row["flops_fraction"] == pytest.approx(expected, rel=1e-12)
        assert row["histogram"] == torch.bincount(ids, minlength=len(router)).tolist()
        assert row["lam"] == penalty.lam
        assert row["flops_fraction_with_router"] > row["flops_fraction"]
        fractions.append(row["flops_fraction"])
    assert fractions == sorted(fractions)  # a larger budget never routes to less compute
    for random, row in zip(report["random"], report["budgets"], strict=True):
        assert random["histogram"] == row["histogram"]
        assert random["flops_fraction"] == pytest.approx(row["flops_fraction"], rel=1e-12)


def test_random_routing_rows_average_the_shuffles(trained) -> None:
    model, data, table = trained["model"], trained["data"], trained["table"]
    row = trained["report"]["random"][1]
    runs = [evaluate(model, data, "test", penalty=table.penalty(row["budget"]),
                     shuffle_routing_seed=s) for s in range(SHUFFLES)]
    assert row["per_shuffle"]["ndcg@10"] == [r["metrics"]["ndcg@10"] for r in runs]
    assert row["ndcg@10"] == pytest.approx(np.mean(row["per_shuffle"]["ndcg@10"]), rel=1e-12)


def test_comparisons_are_paired_differences_with_one_verdict_rule(trained) -> None:
    model, data, table = trained["model"], trained["data"], trained["table"]
    report = trained["report"]
    fixed = {r["config_id"]: r for r in report["fixed"]}
    by_budget: dict[float, list[dict]] = {}
    for c in report["comparisons"]:
        by_budget.setdefault(c["budget"], []).append(c)
        if c["verdict"] is not None:  # the rule, from the interval alone
            expected = ("beats" if c["low"] > 0 else "worse" if c["high"] < 0
                        else "no difference shown")
            assert c["verdict"] == expected
            assert c["low"] <= c["difference"] <= c["high"]
    assert sorted(by_budget) == BUDGETS
    for row in report["budgets"]:
        kinds = {c["other"]: c for c in by_budget[row["budget"]]}
        # The best fixed sub-network of no more FLOPs, chosen independently here.
        eligible = [i for i, f in enumerate(model.flops_fractions)
                    if f <= row["flops_fraction_with_router"]]
        best_fixed = [c for c in by_budget[row["budget"]] if c["kind"] == "best fixed"]
        assert len(best_fixed) == 1
        if not eligible:
            assert best_fixed[0]["verdict"] is None
            continue
        best = max(eligible, key=lambda i: fixed[i]["ndcg@10"])
        assert best_fixed[0]["other"] == f"fixed config {best}"
        canet = evaluate(model, data, "test", penalty=table.penalty(row["budget"]),
                         per_user=True)["per_user"]["ranks"]
        other = evaluate(model, data, "test", fixed_config_id=best,
                         per_user=True)["per_user"]["ranks"]
        expected = paired_difference(canet, other, "ndcg@10", seed=0)
        assert {k: best_fixed[0][k] for k in expected} == expected
        assert kinds["broken"]["verdict"] == "beats"
        assert kinds["largest"]["no_more_flops"] is (
            row["flops_fraction_with_router"] >= 1.0)
    # CANet at budget 1.0 is the router's own routing: against itself, a zero difference.
    itself = next(c for c in by_budget[1.0] if c["other"] == "itself")
    assert itself["difference"] == itself["low"] == itself["high"] == 0.0
    assert itself["verdict"] == "no difference shown"


def test_verdict_rule() -> None:
    assert verdict(0.001, 0.01) == "beats"
    assert verdict(-0.01, -1e-9) == "worse"
    assert verdict(-0.01, 0.01) == verdict(0.0, 0.0) == verdict(0.0, 0.1) == (
        "no difference shown")


def _first_cells(section: str) -> list[str]:
    """The first cell of each body row of the Markdown table in ``section``."""
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert set(rows[1].replace("|", "").split()) == {"---"}  # header, separator, body
    return [row.split(" | ")[0][2:] for row in rows[2:]]


def test_markdown_has_a_row_per_budget_and_config(trained) -> None:
    report = {**trained["report"], "command": "canet pareto RUN --data LOG"}
    text = render_markdown(report)
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    assert _first_cells(sections["CANet at each budget"]) == [f"{b:g}" for b in BUDGETS]
    assert _first_cells(sections["Fixed sub-networks of the same supernet"]) == [
        str(c) for c in range(trained["model"].space.n_configs)]
    assert _first_cells(sections["Random routing with each budget's histogram"]) == [
        f"{b:g}" for b in BUDGETS]
    assert _first_cells(sections["Other runs"]) == ["broken", "itself", "largest"]
    comparisons = sections["Comparisons: CANet at a budget - other, NDCG@10"]
    assert len(_first_cells(comparisons)) == len(report["comparisons"])
    assert comparisons.count("| beats |") >= len(BUDGETS)  # at least vs the broken model
    assert "favours the fixed sub-networks" in comparisons
    assert "canet pareto RUN --data LOG" in text


def test_bad_library_inputs(trained) -> None:
    model, data, table = trained["model"], trained["data"], trained["table"]
    for budgets, message in (([0.3, "0.3"], "0.3 twice"), ([0.05], "smallest achievable"),
                             ([float("nan")], "in \\(0, 1\\]"), ([], "no budgets")):
        with pytest.raises(BudgetError, match=message):
            check_budgets(budgets, table)
    assert check_budgets(["1", 0.35], table) == [0.35, 1.0]
    with pytest.raises(CanetError, match="shuffles"):
        pareto_report(model, data, table, shuffles=0, log=None)
    with pytest.raises(CanetError, match="distinct names"):
        pareto_report(model, data, table, against=[("a", model), ("a", model)], log=None)
    # Another log's split of the same users: refused before any evaluation.
    other = build_dataset(synthetic_log(200, 60, 1, seq_len=(5, 12)), model.max_len)
    assert other.num_items == data.num_items
    with pytest.raises(CanetError, match="other test users or targets"):
        pareto_report(model, data, table, against=[AgainstRun("b", model, None, other)],
                      log=None)


def test_writers_without_matplotlib(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    said: list[str] = []
    written = write_report(trained["report"], tmp_path / "out", log=said.append)
    assert [p.name for p in written] == ["pareto.json", "pareto.md"]
    assert json.loads((tmp_path / "out" / "pareto.json").read_text()) == json.loads(
        json.dumps(trained["report"]))
    assert len(said) == 1 and "matplotlib" in said[0]
    assert not (tmp_path / "out" / "pareto.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pareto.json", "pareto.md"]


def test_writers_plot(trained, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    written = write_report(trained["report"], tmp_path, log=None)
    assert [p.name for p in written] == ["pareto.json", "pareto.md", "pareto.png"]
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(trained):
    """Runs beside the main one: a fixed config on the same log, and runs on other logs (the
    same users and items in other sequences; other users)."""
    root = trained["root"]
    other_seed = write_csv_log(root / "other-seed.csv", users=200, items=60, seed=1)
    other_users = write_csv_log(root / "other-users.csv", users=150, items=60)
    one_epoch = {"epochs": 1}
    return {
        "fixed": _train(root, "fixed", trained["log"], fixed_config="largest", **one_epoch),
        "other_seed": _train(root, "other-seed", other_seed, **one_epoch),
        "other_users": _train(root, "other-users", other_users, **one_epoch),
    }



def test_cli_writes_the_report(trained, runs, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run, log = str(trained["run"]), str(trained["log"])
    out = tmp_path / "report"
    argv = ["pareto", run, "--data", log, "--budgets", "1,0.35", "--shuffles", "1",
            "--against", str(runs["fixed"]), "--backend", "model", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "pareto.json").read_text())
    assert [r["budget"] for r in report["budgets"]] == [0.35, 1.0]
    largest = trained["model"].space.largest_id
    assert report["against"][0]["fixed_config_id"] == largest
    assert report["against"][0]["flops_fraction"] == pytest.approx(1.0)
    assert report["against"][0]["metrics"] == evaluate(
        load_checkpoint(runs["fixed"]).model, trained["data"], "test",
        fixed_config_id=largest)["metrics"]
    progress = [line for line in captured.err.splitlines() if line.startswith("pareto: ")]
    evaluations = 2 * 2 + trained["model"].space.n_configs + 1
    assert report["evaluations"] == evaluations
    assert sum(f"/{evaluations} " in line for line in progress) == evaluations
    assert sum("matplotlib" in line for line in captured.err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["pareto.json", "pareto.md"]
    markdown = (out / "pareto.md").read_text()
    assert report["command"] in markdown and "--budgets 0.35,1 --shuffles 1" in report["command"]
    assert f"-> {out / 'pareto.md'}" in captured.out


def test_cli_default_out_and_budgets(trained, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run, log = str(trained["run"]), str(trained["log"])
    assert cli.main(["pareto", run, "--data", log, "--split", "valid", "--shuffles", "1",
                     "--backend", "torch"]) == 0
    capsys.readouterr()
    report = json.loads((trained["run"] / "pareto-valid" / "pareto.json").read_text())
    assert [r["budget"] for r in report["budgets"]] == BUDGETS  # the table's
    assert report["split"] == "valid" and report["backend"] == "torch"


def test_cli_given_best_writes_into_the_run_directory(trained, capsys, monkeypatch) -> None:
    """A checkpoint directory holds its listed files only (the next calibration rebuilds it):
    the report of RUN/best goes to RUN/pareto-<split>/."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run, log = trained["run"], str(trained["log"])
    target = run / "pareto-valid" / "pareto.json"
    target.unlink(missing_ok=True)
    assert cli.main(["pareto", str(run / "best"), "--data", log, "--split", "valid",
                     "--shuffles", "1", "--budgets", "1", "--backend", "torch"]) == 0
    capsys.readouterr()
    assert json.loads(target.read_text())["split"] == "valid"
    assert not (run / "best" / "pareto-valid").exists()


def test_cli_unwritable_out_fails_before_evaluating(trained, capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = cli_fails(capsys, ["pareto", str(trained["run"]), "--data", str(trained["log"]),
                             "--out", str(blocker / "out")])
    assert str(blocker) in message  # one line: no evaluation's progress came before it


@pytest.mark.parametrize(("args", "expected"), [
    (["--budgets", "0"], "got '0'"),
    (["--budgets", "1.5"], "got '1.5'"),
    (["--budgets", "nan"], "got 'nan'"),
    (["--budgets", "abc"], "got 'abc'"),
    (["--budgets", "0.3,0.5,0.3"], "0.3 twice"),
    (["--budgets", "0.3,,0.5"], "got ''"),
    (["--budgets", "0.05"], "smallest achievable budget is"),
    (["--shuffles", "0"], "--shuffles must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--against", "{other_seed}"], "not the split the checkpoint was trained on"),
    (["--against", "{other_users}"], "differ from the checkpoint's vocab.json"),
])
def test_cli_bad_input(trained, runs, capsys, tmp_path, args, expected) -> None:
    args = [a.format(**{k: str(v) for k, v in runs.items()}) for a in args]
    message = cli_fails(capsys, ["pareto", str(trained["run"]), "--data", str(trained["log"]),
                             "--out", str(tmp_path / "out"), *args])
    assert expected in message
    if "--against" in args:  # the message names the run that was refused
        assert message.startswith(f"canet: error: --against {args[-1]}: ")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_fixed_config_run_and_a_run_without_table(trained, runs, capsys) -> None:
    log = str(trained["log"])
    message = cli_fails(capsys, ["pareto", str(runs["fixed"]), "--data", log])
    assert "a Pareto report does not apply to a fixed-config run" in message
    run, log = str(runs["other_seed"]), str(trained["root"] / "other-seed.csv")
    message = cli_fails(capsys, ["pareto", run, "--data", log])
    assert message == (f"canet: error: {run} has no calibration table: run `canet calibrate "
                       f"{run} --data {log}`")
