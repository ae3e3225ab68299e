"""Tests for canet.train: the CANet step, fixed-config runs, resume, NaN handling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import canet.train as train_module
from canet.checkpoint import load_checkpoint, load_training_state
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.errors import CheckpointError, ConfigError
from canet.losses import flops_loss, smallest_hits
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
    assert with_balance.item() == pytest.approx(plain.item() + 0.5 * float(parts_b["balance"]),
                                              rel=1e-6)


def test_flops_target_adds_its_weighted_penalty_to_the_same_step(data) -> None:
    config = config_from_dict(TINY)
    targeted = config_from_dict({**TINY, "flops_target": 0.3, "flops_weight": 3.0})
    torch.manual_seed(0)
    model = build_model(config, data.num_items).eval()  # no dropout: both see one forward
    seqs, targets = next(data.train_batches(9, torch.Generator().manual_seed(2)))
    plain, parts, chosen = step_loss(model, seqs, targets, config, 1.0,
                                     torch.Generator().manual_seed(1))
    loss, parts_t, chosen_t = step_loss(model, seqs, targets, targeted, 1.0,
                                        torch.Generator().manual_seed(1))
    assert set(parts_t) == set(parts) | {"flops", "expected_flops"}
    assert torch.equal(chosen, chosen_t)  # same noise, same samples
    for name in parts:
        assert torch.equal(parts[name], parts_t[name]), name
    # The penalty and expected fraction of the router's own logits, in float64 from the costs
    # a serve-time budget counts.
    with torch.no_grad():
        probs = torch.softmax(model.router.logits_unchecked(seqs).double(), dim=-1)
    expected = float((probs @ torch.tensor(model.flops_fractions, dtype=torch.float64)).mean())
    assert float(parts_t["expected_flops"]) == pytest.approx(expected, rel=1e-6)
    assert float(parts_t["flops"]) == pytest.approx((expected - 0.3) ** 2, rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 3.0 * (expected - 0.3) ** 2, rel=1e-6)
    # The term trains the router only.
    model.zero_grad()
    flops_loss(model.router.logits_unchecked(seqs), torch.tensor(model.flops_fractions),
               0.3)[0].backward()
    assert model.router.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.supernet.parameters())


def _mean_fraction(histogram: list[int], fractions: tuple[float, ...]) -> float:
    counts = torch.tensor(histogram, dtype=torch.float64)
    return float(counts @ torch.tensor(fractions, dtype=torch.float64) / counts.sum())


def test_flops_target_run_logs_the_term_and_the_achieved_fractions(tmp_path, data) -> None:
    lines: list[str] = []
    config = config_from_dict({**TINY, "flops_target": 0.3})
    result = train(config, data, tmp_path / "t", log=lines.append)
    fractions = load_checkpoint(tmp_path / "t" / "last").model.flops_fractions
    for record in result.history:
        assert 0 < record["expected_flops"] <= 1 and record["flops"] >= 0
        assert record["sampled_flops_fraction"] == pytest.approx(
            _mean_fraction(record["sampled_histogram"], fractions), rel=1e-12)
        # The logged loss is the optimised one: the expected fraction is not a term of it.
        assert record["loss"] == pytest.approx(
            record["next_item"] + 0.01 * record["guide"] + 0.01 * record["uniform"]
            + config.flops_weight * record["flops"], rel=1e-6)
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    for line, record in zip(epoch_lines, result.history, strict=True):
        assert (f"flops {record['flops']:.4f} (expected {record['expected_flops']:.3f}, "
                "target 0.30)") in line
        assert "% of largest" in line
    state = load_training_state(tmp_path / "t" / "last")[0]
    assert state["history"][-1]["expected_flops"] == result.history[-1]["expected_flops"]


def test_without_a_flops_target_the_objective_is_the_papers(tmp_path, data, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("flops_loss called without flops_target")

    monkeypatch.setattr(train_module, "flops_loss", refuse)
    lines: list[str] = []
    default = train(config_from_dict(TINY), data, tmp_path / "d", log=lines.append).history
    monkeypatch.undo()
    fractions = load_checkpoint(tmp_path / "d" / "last").model.flops_fractions
    for record in default:
        assert not {"flops", "expected_flops"} & set(record)
        assert record["loss"] == pytest.approx(
            record["next_item"] + 0.01 * record["guide"] + 0.01 * record["uniform"], rel=1e-6)
        assert record["sampled_flops_fraction"] == pytest.approx(
            _mean_fraction(record["sampled_histogram"], fractions), rel=1e-12)
    assert not any("expected" in line for line in lines)
    # The term at weight 0 changes nothing: same losses, samples and validation, bit for bit.
    zero = config_from_dict({**TINY, "flops_target": 0.5, "flops_weight": 0.0})
    weighted0 = train(zero, data, tmp_path / "z", log=_quiet).history
    same = ("loss", "next_item", "guide", "uniform", "grad_norm", "sampled_histogram",
            "sampled_flops_fraction", "valid", "valid_histogram", "valid_flops_fraction")
    for a, b in zip(default, weighted0, strict=True):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


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
    assert record["sampled_flops_fraction"] is None
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


# -- the fast step (issue 13): same loss and gradients as the full-padding computation -------


def _random_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the init (residual scales ~1), so every block and head matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "res_scale" in name:
                p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def _mixed_batch(lengths: list[int], max_len: int, num_items: int, seed: int):
    """Left-padded windows ``[B, max_len]`` with the given real lengths, their next-item targets,
    and the batch trimmed to its longest window (the last L' columns)."""
    generator = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(len(lengths), max_len, dtype=torch.int64)
    targets = torch.zeros_like(seqs)
    for row, length in enumerate(lengths):
        for tensor in (seqs, targets):
            tensor[row, max_len - length :] = torch.randint(
                1, num_items + 1, (length,), generator=generator
            )
    width = max(lengths)
    return seqs, targets, seqs[:, -width:].contiguous(), targets[:, -width:].contiguous()


@pytest.mark.parametrize("fixed", [None, 3])
@pytest.mark.parametrize("lengths", [[1, 5, 12, 3, 7, 1, 9], [1], [4], [1, 1, 1], [12, 12]])
def test_trimmed_targeted_step_equals_the_full_padding_step_in_float64(fixed, lengths) -> None:
    max_len, num_items = 12, 40
    config = config_from_dict({**TINY, "max_len": max_len, "dropout": 0.0, "balance_weight": 0.3,
                               "guide_k": 5})
    model = build_model(config, num_items).double().train()
    _random_weights(model, seed=len(lengths))
    seqs, targets, short_seqs, short_targets = _mixed_batch(lengths, max_len, num_items, seed=7)

    def loss_and_grads(seqs, targets, **kwargs):
        model.zero_grad(set_to_none=True)
        loss, parts, _ = step_loss(model, seqs, targets, config, 0.7,
                                   torch.Generator().manual_seed(5), fixed, **kwargs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), parts, grads

    old_loss, old_parts, old_grads = loss_and_grads(seqs, targets, all_positions=True)
    positions = short_targets.flatten().nonzero().squeeze(1)
    new_loss, new_parts, new_grads = loss_and_grads(short_seqs, short_targets,
                                                    target_positions=positions)
    assert old_parts.keys() == new_parts.keys()
    assert (new_loss - old_loss).abs() <= 1e-10 * old_loss.abs()
    for name in old_parts:
        assert (new_parts[name] - old_parts[name]).abs() <= 1e-10 * old_parts[name].abs() + 1e-15
    assert old_grads.keys() == new_grads.keys()
    for name, old in old_grads.items():
        scale = max(old.abs().max().item(), 1e-300)
        difference = (new_grads[name] - old).abs().max().item()
        assert difference <= 1e-10 * scale, (name, difference, scale)
    # Without given positions the step finds them itself: the same loss.
    again, _, _ = loss_and_grads(short_seqs, short_targets)
    assert again == new_loss


def test_a_training_step_reads_back_from_the_device_once(tmp_path, data, monkeypatch) -> None:
    """Host reads (Tensor.item/__bool__/__float__/__int__/tolist/cpu/numpy: each a device sync
    on a GPU) made by canet's code inside the epoch loop, counted on CPU: one per step (the
    fused finiteness check) plus a few per epoch. Validation and checkpoints are not counted."""
    import sys

    import canet

    package = str(Path(canet.__file__).parent)
    calls = {"n": 0}

    def in_epoch_loop(frame) -> bool:
        while frame is not None:
            if frame.f_code.co_name == "train_epoch":
                return True
            frame = frame.f_back
        return False

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package) and in_epoch_loop(caller):
                calls["n"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    config = config_from_dict({**TINY, "epochs": 1, "batch_size": 4})
    steps = data.num_train_batches(4)
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    result = train(config, data, tmp_path, log=_quiet)
    monkeypatch.undo()
    assert result.history[0]["steps"] == steps > 10
    assert steps <= calls["n"] <= steps + 4, f"{calls['n']} host reads for {steps} steps"


def test_epoch_records_report_throughput(tmp_path, data) -> None:
    result = train(config_from_dict({**TINY, "epochs": 1}), data, tmp_path, log=_quiet)
    record = result.history[0]
    real_targets = sum(int((t != 0).sum()) for _, t in data.train_batches(16))
    assert record["targets"] == real_targets
    assert record["steps_per_second"] == pytest.approx(record["steps"] / record["train_seconds"])
    assert record["targets_per_second"] == pytest.approx(real_targets / record["train_seconds"])
    assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    state = load_training_state(tmp_path / "last")[0]
    assert state["history"][0]["targets_per_second"] == record["targets_per_second"]
    assert result.train_seconds == record["train_seconds"]
    assert result.targets_per_second == pytest.approx(record["targets_per_second"])


def test_clip_grad_norm_bounds_every_update(tmp_path, data, monkeypatch) -> None:
    norms = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    train(config_from_dict({**TINY, "epochs": 1, "clip_grad_norm": 1e-3}), data, tmp_path,
          log=_quiet)
    assert norms and max(norms) <= 1e-3 * (1 + 1e-5)


def test_bf16_precision_is_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match="bf16 trains on CUDA only"):
        config_from_dict({"precision": "bf16"})
    with pytest.raises(ConfigError, match="precision must be one of"):
        config_from_dict({"precision": "fp16"})
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        config_from_dict({"clip_grad_norm": -1.0})


def test_masked_path_used_under_inference_mode_first_still_trains(data) -> None:
    """The cached choice tables (and the guide's) are plain tensors even when first built under
    torch.inference_mode: a later training step can save them for backward."""
    config = config_from_dict(TINY)
    model = build_model(config, data.num_items)
    seqs, targets = next(data.train_batches(8, torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        model.score_masked(seqs, model.one_hot(torch.zeros(8, dtype=torch.int64)))
        hits = smallest_hits(model, seqs, targets[:, -1])
        from canet.losses import guide_loss

        guide_loss(torch.zeros(8, model.space.n_configs), hits, model.space)
    loss, _, _ = step_loss(model.train(), seqs, targets, config, 1.0, None)
    loss.backward()
    assert model.router.head.weight.grad is not None


@pytest.mark.parametrize("fixed", [None, 2])
@pytest.mark.parametrize("all_positions", [False, True])
def test_bf16_autocast_step_runs_and_keeps_fp32_statistics(data, fixed, all_positions) -> None:
    """The plumbing of precision bf16, on CPU (where training refuses it for speed, not
    correctness): the step runs under autocast, its loss is float32 and near the fp32 loss,
    and every gradient lands in the fp32 master weights."""
    config = config_from_dict({**TINY, "dropout": 0.0})
    model = build_model(config, data.num_items).train()
    seqs, targets = next(data.train_batches(16, torch.Generator().manual_seed(0), trim=True))

    def loss_of(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, parts, _ = step_loss(model, seqs, targets, config, 1.0,
                                       torch.Generator().manual_seed(2), fixed,
                                       all_positions=all_positions)
        loss.backward()
        return loss, parts

    want, _ = loss_of(False)
    got, parts = loss_of(True)
    assert got.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert torch.isfinite(got) and (got - want).abs() <= 0.05 * want.abs()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _reordered(log, seed: int = 1):
    """The same users and items with reversed timestamps: another leave-one-out split."""
    import dataclasses
    return dataclasses.replace(log, timestamps=-log.timestamps)


def test_resume_refuses_the_same_vocabulary_in_another_split(tmp_path) -> None:
    """Issue 14 item 2: the vocabulary alone let a reordered log resume (test targets of the
    first split could then be trained on)."""
    log = synthetic_log(50, 20, 0, seq_len=(5, 14))
    data = build_dataset(log, TINY["max_len"])
    other = build_dataset(_reordered(log), TINY["max_len"])
    assert other.vocab == data.vocab
    config = config_from_dict({**TINY, "epochs": 1})
    train(config, data, tmp_path, log=_quiet)
    identity = load_checkpoint(tmp_path).trainer_state["data"]
    assert identity["interactions"] == len(data.items) and len(identity["sha256"]) == 64
    two = config_from_dict({"epochs": 2}, config)
    with pytest.raises(CheckpointError, match="cannot resume with different data: not the split"):
        train(two, other, tmp_path, resume=True, log=_quiet)
    assert train(two, data, tmp_path, resume=True, log=_quiet).epochs_done == 2


def test_a_checkpoint_without_data_identity_still_resumes(tmp_path, data) -> None:
    """Checkpoints from before the data identity: only the vocabulary is compared."""
    import json
    config = config_from_dict({**TINY, "epochs": 1})
    train(config, data, tmp_path, log=_quiet)
    state_path = tmp_path / "last" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["data"]
    state_path.write_text(json.dumps(state))
    two = config_from_dict({"epochs": 2}, config)
    assert train(two, data, tmp_path, resume=True, log=_quiet).epochs_done == 2
    state["data"] = {"sha256": "zz", "interactions": 3}
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="'data' must be"):
        load_checkpoint(tmp_path / "last")
