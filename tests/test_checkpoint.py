"""Tests for canet.checkpoint: round trip, validation, atomic saves under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from canet.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    cleanup_leftovers,
    load_checkpoint,
    load_model_weights,
    load_training_state,
    save_checkpoint,
    write_text_atomic,
)
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.errors import CheckpointError
from canet.train import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 1, "batch_size": 32, "progress": False,
        "threads": 1}


def _setup(seed: int = 0):
    config = config_from_dict(TINY)
    data = build_dataset(synthetic_log(40, 20, 0, seq_len=(5, 12)), config.max_len)
    torch.manual_seed(seed)
    return config, data, build_model(config, data.num_items).eval()


def _save(path, model, config, data, tag: int = 0):
    return save_checkpoint(path, model, config, data.vocab, {"epoch": tag},
                           {"optimizer": {}, "tag": torch.tensor(tag)})


def _batch(data):
    return next(iter(data.eval_batches("test", 64)))[1]


def test_round_trip_gives_identical_scores(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "best", model, config, data)
    assert sorted(os.listdir(tmp_path / "best")) == sorted(
        ["model.safetensors", "config.yaml", "vocab.json", "trainer_state.json", "optimizer.pt"]
    )
    loaded = load_checkpoint(tmp_path)  # a run dir resolves to best/
    assert loaded.path == tmp_path / "best"
    assert loaded.config == config and loaded.vocab == data.vocab
    assert loaded.model.state_dict().keys() == model.state_dict().keys()
    seqs = _batch(data)
    assert torch.equal(loaded.model.eval().score(seqs), model.score(seqs))
    state, extra = load_training_state(tmp_path / "best")
    assert state["epoch"] == 0 and int(extra["tag"]) == 0


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_truncated_model_file_raises_naming_it_and_keeps_the_model(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data)
    _, _, other = _setup(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    path = tmp_path / "ck" / MODEL_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model_weights(tmp_path / "ck", other)
    _assert_unchanged(other, before)


def test_corrupted_tensor_bytes_are_detected(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data)
    _, _, other = _setup(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    path = tmp_path / "ck" / MODEL_FILE
    raw = bytearray(path.read_bytes())
    raw[-50] ^= 0xFF  # inside the tensor data, header intact
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{path}.*corrupted"):
        load_model_weights(tmp_path / "ck", other)
    _assert_unchanged(other, before)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(tmp_path / "ck")


def test_other_files_corrupted_or_missing(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data)
    state = tmp_path / "ck" / STATE_FILE
    text = state.read_text()
    state.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=str(state)):
        load_checkpoint(tmp_path / "ck")
    state.write_text(text)
    opt = tmp_path / "ck" / OPTIMIZER_FILE
    opt.write_bytes(opt.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=str(opt)):
        load_training_state(tmp_path / "ck")
    (tmp_path / "ck" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="vocab.json: missing"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty")


def test_other_model_is_refused(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data)
    bigger = config_from_dict({"hidden": [8, 32]}, config)
    other = build_model(bigger, data.num_items)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another model architecture.*space"):
        load_model_weights(tmp_path / "ck", other)
    _assert_unchanged(other, before)


def test_a_refused_checkpoint_leaves_the_callers_model_unchanged(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data)
    # A model file from another run (dropout 0.5) dropped into this checkpoint (dropout 0.2):
    # it fits the caller's dropout-0.5 model, but the checkpoint as a whole must be refused
    # before any weight is copied in.
    config_b = config_from_dict({"dropout": 0.5}, config)
    _, _, seeded = _setup(seed=3)
    model_b = build_model(config_b, data.num_items)
    model_b.load_state_dict(seeded.state_dict())
    _save(tmp_path / "other", model_b, config_b, data)
    (tmp_path / "ck" / MODEL_FILE).write_bytes((tmp_path / "other" / MODEL_FILE).read_bytes())
    target = build_model(config_b, data.num_items)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="dropout"):
        load_checkpoint(tmp_path / "ck", model=target)
    _assert_unchanged(target, before)


def test_nan_weights_are_never_saved(tmp_path) -> None:
    config, data, model = _setup()
    _save(tmp_path / "ck", model, config, data, tag=1)
    with torch.no_grad():
        model.supernet.out.bias[3] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf"):
        _save(tmp_path / "ck", model, config, data, tag=2)
    assert load_training_state(tmp_path / "ck")[0]["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    import canet.checkpoint as ckpt
    from tests.test_checkpoint import _setup, _save
    config, data, model = _setup()
    with torch.no_grad():
        model.supernet.out.bias.fill_(1.0)
    where = sys.argv[1]
    if where == "between_files":
        real = ckpt._write_text
        def dying(path, text):
            if path.name == "vocab.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, text)
        ckpt._write_text = dying
    else:
        real_rename = os.rename
        def dying_rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.os.rename = dying_rename
    _save(sys.argv[2], model, config, data, tag=2)
    """
)


@pytest.mark.parametrize("where", ["between_files", "between_renames"])
def test_save_killed_mid_write_keeps_the_previous_checkpoint(tmp_path, where) -> None:
    config, data, model = _setup()
    target = tmp_path / "best"
    _save(target, model, config, data, tag=1)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, str(script), where, str(target)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".best")]
    assert leftovers, "the kill should have left a partial save behind"
    # The previous checkpoint is still loadable (read in place if mid-swap)...
    loaded = load_checkpoint(target)
    assert loaded.trainer_state["epoch"] == 1
    seqs = _batch(data)
    assert torch.equal(loaded.model.score(seqs), model.score(seqs))
    # ...and the next start cleans up: previous checkpoint back in place, no leftovers.
    assert cleanup_leftovers(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".best")]
    assert json.loads((target / STATE_FILE).read_text())["epoch"] == 1
    # A later save works normally.
    _save(target, model, config, data, tag=3)
    assert load_checkpoint(target).trainer_state["epoch"] == 3


def test_write_text_atomic_replaces_whole_files_only(tmp_path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    write_text_atomic("old\n", path)
    write_text_atomic("new\n", path)
    assert path.read_text() == "new\n"
    with pytest.raises(TypeError):
        write_text_atomic(b"bytes are not text", path)  # fails while writing the temporary
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no leftover


def test_write_bytes_atomic_writes_bytes_and_refuses_text(tmp_path) -> None:
    from canet._io import write_bytes_atomic

    path = tmp_path / "plot.png"
    payload = bytes(range(256)) * 3  # every byte value, \r and \n included: no newline translation
    write_bytes_atomic(payload, path)
    assert path.read_bytes() == payload
    with pytest.raises(TypeError):
        write_bytes_atomic("text is not bytes", path)
    assert path.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_and_directories_follow_the_umask(tmp_path, umask) -> None:
    """Issue 14 item 6: best/ and last/ were 0700 and model.safetensors 0600 (mkdtemp's and
    the library's modes) whatever the umask, so no other account could load a run."""
    from canet._io import process_umask
    from canet.checkpoint import REQUIRED_FILES, lock_run_dir

    config, data, model = _setup()
    before = os.umask(umask)
    try:
        assert process_umask() == umask
        with lock_run_dir(tmp_path / "run"):
            target = _save(tmp_path / "run" / "best", model, config, data)
            _save(target, model, config, data, tag=1)  # the swap path too
        write_text_atomic("{}", tmp_path / "run" / "metrics.json")
    finally:
        os.umask(before)
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(target) == 0o777 & ~umask
    for name in REQUIRED_FILES:
        assert mode(target / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "run" / "metrics.json") == 0o666 & ~umask
    assert mode(tmp_path / "run" / ".lock") == 0o666 & ~umask
    assert load_checkpoint(target).trainer_state["epoch"] == 1
