"""Every canet command over malformed inputs: exit status 2, exactly one stderr line under 300
characters, no traceback, and nothing created or changed in the run directory or the working
directory (issue 14). Grow the table whenever a defect is found."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, train_tiny_run, write_csv_log  # tests/ is on sys.path

from canet import cli


def _alias_bomb() -> str:
    parts, previous = ["&a [l,l,l,l,l,l,l,l,l]"], "a"
    for name in "bcdefghi":
        parts.append(f"&{name} [" + ",".join([f"*{previous}"] * 9) + "]")
        previous = name
    return "epochs: [" + ", ".join(parts) + "]\n"


# File name -> content (str or bytes), written into the working directory before each case.
FILES: dict[str, str | bytes] = {
    "three.txt": "1 1\n1 2\n1 3\n2 1\n2 2\n2 3\n",
    "empty.csv": "",
    "nouser.csv": "uid,iid,ts\n1,2,3\n",
    "bomb.yaml": _alias_bomb(),
    "bigint.yaml": "epochs: " + "9" * 5000 + "\n",
    "list.yaml": "[1, 2]\n",
    "h.json": json.dumps({"alice": ["i1", "i2"]}),
    "bad.json": "{not json",
    "recs.csv": "already here\n",
    "latin.csv": b"user_id,item_id,rank\n1,\xe9t\xe9,3\n",
    "header.csv": "user,item\n",
}

# (id, argv); {run} is a trained run, {log} its data, {ranks} its --ranks-out file, and
# bare file names are the FILES above in the working directory.
CASES: list[tuple[str, list[str]]] = [
    # train
    ("train_no_training_windows", ["train", "--data", "three.txt", "--out", "new"]),
    ("train_empty_data", ["train", "--data", "empty.csv", "--out", "new"]),
    ("train_missing_data", ["train", "--data", "nope.csv", "--out", "new"]),
    ("train_no_user_column", ["train", "--data", "nouser.csv", "--out", "new"]),
    ("train_device_meta", ["train", "--data", "{log}", "--out", "new", "--device", "meta"]),
    ("train_device_nonsense", ["train", "--data", "{log}", "--out", "new", "--device", "x"]),
    ("train_device_cuda", ["train", "--data", "{log}", "--out", "new", "--device", "cuda"]),
    ("train_weight_decay_nan", ["train", "--data", "{log}", "--out", "new", "--weight-decay",
                                ".nan"]),
    ("train_seed_overflow", ["train", "--data", "{log}", "--out", "new", "--seed",
                             "18446744073709551617"]),
    ("train_max_len_huge", ["train", "--data", "{log}", "--out", "new", "--max-len",
                            "100000000"]),
    ("train_guide_weight_inf", ["train", "--data", "{log}", "--out", "new", "--guide-weight",
                                ".inf"]),
    ("train_tau_start_inf", ["train", "--data", "{log}", "--out", "new", "--tau-start", ".inf"]),
    ("train_flops_target_above_1", ["train", "--data", "{log}", "--out", "new",
                                    "--flops-target", "1.5"]),
    ("train_flops_target_text", ["train", "--data", "{log}", "--out", "new", "--flops_target",
                                 "lots"]),
    ("train_flops_target_fixed_config", ["train", "--data", "{log}", "--out", "new",
                                         "--flops-target", "0.3", "--fixed-config", "largest"]),
    ("train_flops_weight_negative", ["train", "--data", "{log}", "--out", "new",
                                     "--flops-weight=-1"]),
    ("train_alias_bomb", ["train", "--data", "{log}", "--out", "new", "--config", "bomb.yaml"]),
    ("train_config_huge_int", ["train", "--data", "{log}", "--out", "new", "--config",
                               "bigint.yaml"]),
    ("train_config_not_mapping", ["train", "--data", "{log}", "--out", "new", "--config",
                                  "list.yaml"]),
    ("train_config_missing", ["train", "--data", "{log}", "--out", "new", "--config",
                              "nope.yaml"]),
    ("train_into_existing_run", ["train", "--data", "{log}", "--out", "{run}", *TINY_ARGS]),
    ("train_resume_bad_device", ["train", "--data", "{log}", "--resume", "{run}", "--device",
                                 "meta"]),
    # evaluate
    ("evaluate_no_training_windows", ["evaluate", "{run}", "--data", "three.txt"]),
    ("evaluate_missing_run", ["evaluate", "nowhere", "--data", "{log}"]),
    ("evaluate_bad_backend", ["evaluate", "{run}", "--data", "{log}", "--backend", "gpu"]),
    ("evaluate_budget_zero", ["evaluate", "{run}", "--data", "{log}", "--budget", "0"]),
    ("evaluate_budget_negative", ["evaluate", "{run}", "--data", "{log}", "--budget", "-0.1"]),
    ("evaluate_budget_above_one", ["evaluate", "{run}", "--data", "{log}", "--budget", "1.5"]),
    ("evaluate_budget_nan", ["evaluate", "{run}", "--data", "{log}", "--budget", "nan"]),
    ("evaluate_budget_not_a_number", ["evaluate", "{run}", "--data", "{log}", "--budget",
                                      "abc"]),
    ("evaluate_budget_below_smallest", ["evaluate", "{run}", "--data", "{log}", "--budget",
                                        "0.01"]),
    ("evaluate_max_flops_zero", ["evaluate", "{run}", "--data", "{log}", "--max-flops", "0"]),
    ("evaluate_max_flops_below_every_config", ["evaluate", "{run}", "--data", "{log}",
                                               "--max-flops", "0.01"]),
    # recommend
    ("recommend_output_is_input", ["recommend", "{run}", "--input", "h.json", "--output",
                                   "h.json", "--overwrite"]),
    ("recommend_output_exists", ["recommend", "{run}", "--input", "h.json", "--output",
                                 "recs.csv"]),
    ("recommend_k_zero", ["recommend", "{run}", "--input", "h.json", "-k", "0", "--output",
                          "out.csv"]),
    ("recommend_missing_input", ["recommend", "{run}", "--input", "nope.json", "--output",
                                 "out.csv"]),
    ("recommend_bad_json", ["recommend", "{run}", "--input", "bad.json", "--output",
                            "out.csv"]),
    ("recommend_bad_backend", ["recommend", "{run}", "--input", "h.json", "--backend", "gpu",
                               "--output", "out.csv"]),
    ("recommend_budget_zero", ["recommend", "{run}", "--input", "h.json", "--output", "out.csv",
                               "--budget", "0"]),
    ("recommend_budget_negative", ["recommend", "{run}", "--input", "h.json", "--output",
                                   "out.csv", "--budget", "-0.1"]),
    ("recommend_budget_above_one", ["recommend", "{run}", "--input", "h.json", "--output",
                                    "out.csv", "--budget", "1.5"]),
    ("recommend_budget_nan", ["recommend", "{run}", "--input", "h.json", "--output", "out.csv",
                              "--budget", "nan"]),
    ("recommend_budget_not_a_number", ["recommend", "{run}", "--input", "h.json", "--output",
                                       "out.csv", "--budget", "abc"]),
    ("recommend_budget_below_smallest", ["recommend", "{run}", "--input", "h.json", "--output",
                                         "out.csv", "--budget", "0.01"]),
    # calibrate
    ("calibrate_budgets_duplicate", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                     "0.3,0.5,0.30"]),
    ("calibrate_budgets_zero", ["calibrate", "{run}", "--data", "{log}", "--budgets", "0,0.5"]),
    ("calibrate_budgets_negative", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                    "-0.1"]),
    ("calibrate_budgets_above_one", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                     "0.5,1.5"]),
    ("calibrate_budgets_nan", ["calibrate", "{run}", "--data", "{log}", "--budgets", "nan"]),
    ("calibrate_budgets_not_numbers", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                       "abc"]),
    ("calibrate_budgets_empty_entry", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                       "0.3,,0.5"]),
    ("calibrate_budget_below_smallest", ["calibrate", "{run}", "--data", "{log}", "--budgets",
                                         "0.01"]),
    ("calibrate_no_training_windows", ["calibrate", "{run}", "--data", "three.txt"]),
    ("calibrate_missing_run", ["calibrate", "nowhere", "--data", "{log}"]),
    ("calibrate_batch_size_zero", ["calibrate", "{run}", "--data", "{log}", "--batch-size",
                                   "0"]),
    # compare
    ("compare_not_utf8", ["compare", "latin.csv", "--against", "{ranks}"]),
    ("compare_missing", ["compare", "nope.csv", "--against", "{ranks}"]),
    ("compare_bad_header", ["compare", "header.csv", "--against", "{ranks}"]),
    ("compare_bad_metric", ["compare", "{ranks}", "--against", "{ranks}", "--metric", "auc"]),
    # usage
    ("unknown_command", ["frobnicate"]),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and mode of everything under ``root``; a run directory's writer lock
    (``.lock``) only by its presence: a command that takes the lock records its pid there."""
    return {
        str(path.relative_to(root)): (0, 0, 0) if path.name == ".lock" else
        (stat.st_size, stat.st_mtime_ns, stat.st_mode)
        for path in sorted(root.rglob("*"))
        for stat in [path.lstat()]
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    data = write_csv_log(root / "log.csv")  # 40 users, 20 items, seed 0, lengths 5..12
    run = train_tiny_run(data, root / "run")
    ranks = root / "ranks.csv"
    assert cli.main(["evaluate", str(run), "--data", str(data), "--output",
                     str(root / "m.json"), "--ranks-out", str(ranks)]) == 0
    return {"run": str(run), "log": str(data), "ranks": str(ranks)}


@pytest.mark.parametrize(("argv"), [argv for _, argv in CASES], ids=[name for name, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys, argv
) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for name, content in FILES.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(tmp_path)
    run = Path(trained["run"])
    before_run, before_work = _snapshot(run), _snapshot(tmp_path)
    capsys.readouterr()
    status = cli.main([arg.format(**trained) for arg in argv])
    captured = capsys.readouterr()
    assert status == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("canet: error: "), captured.err
    assert len(lines[0]) < 300, lines[0]
    assert "Traceback" not in captured.err
    assert _snapshot(run) == before_run, "the run directory changed"
    assert _snapshot(tmp_path) == before_work, sorted(
        set(_snapshot(tmp_path)) ^ set(before_work))
    assert not os.path.exists(tmp_path / "new")
