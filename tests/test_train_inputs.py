"""Tests for canet.train on inputs that cannot train: no run "succeeds" without an optimizer
step (issue 14, item 4)."""

from __future__ import annotations

import numpy as np
import pytest

import canet.train as train_module
from canet.config import config_from_dict
from canet.data import SequenceData, Vocab, build_dataset, synthetic_log
from canet.train import TrainingDivergedError, train

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 1, "batch_size": 16, "progress": False,
        "lr": 3e-3, "seed": 3, "threads": 1}


def _quiet(_: str) -> None:
    pass


def test_an_epoch_without_an_optimizer_step_fails_the_run(tmp_path, monkeypatch) -> None:
    # Every batch skipped but fewer than max_bad_steps: before, the run exited 0 and saved an
    # untrained model as best/.
    data = build_dataset(synthetic_log(30, 20, 0, seq_len=(5, 10)), TINY["max_len"])
    real = train_module.step_loss

    def always_nan(*args, **kwargs):
        loss, parts, chosen = real(*args, **kwargs)
        return loss * float("nan"), parts, chosen

    monkeypatch.setattr(train_module, "step_loss", always_nan)
    config = config_from_dict({**TINY, "max_bad_steps": 10_000})
    with pytest.raises(TrainingDivergedError, match="took no optimizer step"):
        train(config, data, tmp_path / "nan", log=_quiet)
    assert not (tmp_path / "nan" / "best").exists()


def test_data_without_training_windows_fails_the_first_epoch(tmp_path) -> None:
    # SequenceData built directly (build_dataset refuses it): every user has 3 items, so no
    # training window exists and no step can be taken.
    three = SequenceData(
        items=np.array([1, 2, 3, 3, 2, 1]), offsets=np.array([0, 3, 6]),
        vocab=Vocab(["a", "b"], ["x", "y", "z"]), max_len=4, path="three.txt",
    )
    assert three.stats["num_train_samples"] == 0
    with pytest.raises(TrainingDivergedError, match="three.txt.*fewer than 4"):
        train(config_from_dict(TINY), three, tmp_path / "three", log=_quiet)
    assert not (tmp_path / "three" / "best").exists()
