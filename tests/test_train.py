"""Tests for canet.train: the CANet step, fixed-config runs, resume, NaN handling."""

from __future__ import annotations

import math

import pytest
import torch

import canet.train as train_module
from canet.checkpoint import load_checkpoint, load_training_state
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.errors import CheckpointError
from canet.losses import smallest_hits
from canet.train import TrainingDivergedError, build_model, step_loss, train

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 2, "batch_size": 16, "progress": False,
        "lr": 3e-3, "seed": 3, "threads": 1}


@pytest.fixture(scope="module")
def data():
    return build_dataset(synthetic_log(50, 20, 0, seq_len=(5, 14)), TINY["max_len"])


def _quiet(_: str) -> None:
    pass


def _weights(path):
    return load_checkpoint(path).model.state_dict()


def test_step_loss_has_every_part_and_gives_router_gradients(data) -> None:
    config = config_from_dict(TINY)
    torch.manual_seed(0)
    model = build_model(config, data.num_items)
    seqs, targets = next(data.train_batches(8, torch.Generator().manual_seed(0)))
    loss, parts, chosen = step_loss(model, seqs, targets, config, 1.0,
                                    torch.Generator().manual_seed(1))
    assert set(parts) == {"next_item", "guide", "uniform"}
    assert chosen.shape == (8,) and int(chosen.max()) < model.space.n_configs
    loss.backward()
    assert model.router.head.weight.grad.abs().sum() > 0
    fixed, parts, chosen = step_loss(model, seqs, targets, config, 1.0, None, fixed_config_id=3)
    assert set(parts) == {"next_item"} and chosen is None
    # The balance term (not the paper's) is added only when its weight is set.
    balanced = config_from_dict({**TINY, "balance_weight": 0.5})
    model.eval()  # no dropout: the two losses see the same forward
    plain, _, _ = step_loss(model, seqs, targets, config, 1.0, torch.Generator().manual_seed(1))
    with_balance, parts_b, _ = step_loss(model, seqs, targets, balanced, 1.0,
                                         torch.Generator().manual_seed(1))
    assert set(parts_b) == {"next_item", "guide", "uniform", "balance"} and parts_b["balance"] > 0
    assert with_balance.item() == pytest.approx(plain.item() + 0.5 * parts_b["balance"], rel=1e-6)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data) -> None:
    config = config_from_dict(TINY)
    full = train(config, data, tmp_path / "full", log=_quiet)
    assert full.epochs_done == 2
    one = config_from_dict({"epochs": 1}, config)
    train(one, data, tmp_path / "split", log=_quiet)
    resumed = train(config, data, tmp_path / "split", resume=True, log=_quiet)
    assert resumed.epochs_done == 2
    a, b = _weights(tmp_path / "full" / "last"), _weights(tmp_path / "split" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a, opt_a = load_training_state(tmp_path / "full" / "last")
    state_b, opt_b = load_training_state(tmp_path / "split" / "last")
    assert state_a["best_score"] == state_b["best_score"]
    assert torch.equal(opt_a["rng"]["generator.data"], opt_b["rng"]["generator.data"])
    assert (tmp_path / "split" / "config.yaml").exists()


def test_resume_refuses_a_changed_architecture(tmp_path, data) -> None:
    config = config_from_dict({**TINY, "epochs": 1})
    train(config, data, tmp_path, log=_quiet)
    wider = config_from_dict({"hidden": [8, 32], "epochs": 2}, config)
    with pytest.raises(CheckpointError, match=r"changed architecture.*hidden"):
        train(wider, data, tmp_path, resume=True, log=_quiet)
    with pytest.raises(CheckpointError, match="already holds a training run"):
        train(config, data, tmp_path, log=_quiet)


def test_fixed_config_run_trains_one_subnetwork(tmp_path, data) -> None:
    config = config_from_dict({**TINY, "epochs": 1, "fixed_config": "largest"})
    result = train(config, data, tmp_path, log=_quiet)
    record = result.history[-1]
    assert "guide" not in record and record["sampled_histogram"] is None
    histogram = record["valid_histogram"]
    assert histogram[-1] == sum(histogram) > 0
    assert record["valid_flops_fraction"] == 1.0


def test_nan_batch_is_skipped_and_never_saved(tmp_path, data, monkeypatch) -> None:
    calls = {"n": 0}
    real = train_module.step_loss

    def poisoned(*args, **kwargs):
        loss, parts, chosen = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # a NaN in one batch's forward pass
            loss = loss * float("nan")
        return loss, parts, chosen

    monkeypatch.setattr(train_module, "step_loss", poisoned)
    result = train(config_from_dict({**TINY, "epochs": 1}), data, tmp_path, log=_quiet)
    assert result.skipped_steps == 1
    for name in ("best", "last"):
        state = load_checkpoint(tmp_path / name).model.state_dict()
        assert all(torch.isfinite(t).all() for t in state.values())
    assert math.isfinite(result.best_score)


def test_too_many_bad_steps_stop_training_and_keep_the_previous_best(
    tmp_path, data, monkeypatch
) -> None:
    config = config_from_dict({**TINY, "epochs": 1})
    train(config, data, tmp_path, log=_quiet)
    best_before = (tmp_path / "best" / "model.safetensors").read_bytes()
    real = train_module.step_loss

    def always_nan(*args, **kwargs):
        loss, parts, chosen = real(*args, **kwargs)
        return loss * float("nan"), parts, chosen

    monkeypatch.setattr(train_module, "step_loss", always_nan)
    more = config_from_dict({"epochs": 3, "max_bad_steps": 2}, config)
    with pytest.raises(TrainingDivergedError, match="max_bad_steps=2"):
        train(more, data, tmp_path, resume=True, log=_quiet)
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == best_before
    assert load_training_state(tmp_path / "last")[0]["epoch"] == 1


def test_nan_gradient_is_caught(tmp_path, data, monkeypatch) -> None:
    real = train_module.step_loss
    calls = {"n": 0}

    def bad_gradient(model, *args, **kwargs):
        loss, parts, chosen = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            # Finite loss, NaN gradient: 0 * (infinite slope of sqrt at 0).
            loss = loss + torch.sqrt(model.supernet.out.bias[:1] * 0.0).sum()
            assert torch.isfinite(loss)
        return loss, parts, chosen

    monkeypatch.setattr(train_module, "step_loss", bad_gradient)
    result = train(config_from_dict({**TINY, "epochs": 1}), data, tmp_path, log=_quiet)
    assert result.skipped_steps == 1


def test_a_failed_overwrite_run_neither_mixes_runs_nor_loses_the_old_one(
    tmp_path, data, monkeypatch
) -> None:
    config = config_from_dict({**TINY, "epochs": 1})
    train(config, data, tmp_path, log=_quiet)
    old_best = (tmp_path / "best" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds"):
        train(config, data, tmp_path, log=_quiet)
    real = train_module.step_loss

    def always_nan(*args, **kwargs):
        loss, parts, chosen = real(*args, **kwargs)
        return loss * float("nan"), parts, chosen

    monkeypatch.setattr(train_module, "step_loss", always_nan)
    messages = []
    with pytest.raises(TrainingDivergedError):
        train(config_from_dict({"max_bad_steps": 1}, config), data, tmp_path, overwrite=True,
              log=messages.append)
    # The failed run left no best/ of its own, and the old run's is not served in its place...
    assert not (tmp_path / "best").exists()
    # ...but it is kept, whole, under replaced/.
    assert (tmp_path / "replaced" / "best" / "model.safetensors").read_bytes() == old_best
    load_checkpoint(tmp_path / "replaced")
    assert any("replaced" in m for m in messages)


def test_guide_label_sees_dropout_in_training_as_the_papers_code(data) -> None:
    """smallest_hits runs in the model's mode: with dropout in train mode (the paper's code
    computes its guide label that way), deterministic in eval mode; it never changes the mode."""
    model = build_model(config_from_dict({"dropout": 0.5, "max_len": data.max_len}), data.num_items)
    seqs, targets = next(data.train_batches(64, torch.Generator().manual_seed(0)))
    k = data.num_items // 2  # many users near the cut, so dropout flips some labels

    def labels(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return smallest_hits(model, seqs, targets[:, -1], k=k)

    model.train()
    in_training = [labels(seed) for seed in range(5)]
    assert model.training
    assert any(not torch.equal(in_training[0], other) for other in in_training[1:])
    model.eval()
    in_eval = [labels(seed) for seed in range(3)]
    assert not model.training
    assert all(torch.equal(in_eval[0], other) for other in in_eval[1:])
