"""Helpers shared by the test modules (one place; test modules never import each other).

``tests/`` is on ``sys.path`` under pytest (rootdir conftest), so a test module does
``from helpers import make_model, batch``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch

from canet import CANet

BENCHES = Path(__file__).resolve().parents[1] / "benches"

# The engine tests' model shape: odd sizes, far from any block size.
NUM_ITEMS = 61
MAX_LEN = 11


def make_model(dtype=torch.float64, seed=0, num_items=NUM_ITEMS, max_len=MAX_LEN, space=None):
    """Random weights everywhere, residual scales and LayerNorm affine far from their inits."""
    torch.manual_seed(seed)
    model = CANet(num_items, max_len, space=space).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "res_scale" in name:
                p.uniform_(0.3, 1.5)
            elif name.endswith(("ln1.weight", "ln2.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.3)
    return model


def batch(size, seed, max_len=MAX_LEN, num_items=NUM_ITEMS, heavy_padding=True):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, num_items + 1, (size, max_len), generator=g)
    if heavy_padding:
        lengths = torch.randint(1, max_len + 1, (size,), generator=g)
        lengths[0] = 1
        seqs[torch.arange(max_len)[None, :] < (max_len - lengths)[:, None]] = 0
    return seqs


def relative_error(got, want):
    return ((got[:, 1:] - want[:, 1:]).abs().max() / want[:, 1:].abs().max()).item()


def reference(model, seqs, config_ids=None):
    with torch.no_grad():
        return model.score(seqs, config_ids)


def assert_rounding_like_pytorch(
    got, model, compute, dtype=torch.float32, atol=1e-6, baseline_compute=None
):
    """The issue's rule for a result ``got`` in ``dtype``: its error against a float64
    reference of the same weights rounded to ``dtype`` is at most 2x the error of PyTorch's
    ``compute(model)`` in that dtype, + ``atol`` (errors relative to the largest value).

    A fixed tolerance cannot judge this: eight blocks of random weights amplify rounding, so in
    float32 both errors come near 1e-5, varying with the batch and the thread count.
    ``compute(model)`` returns the tensor ``got`` stands for, finite values only.
    ``baseline_compute``: where ``got`` is a handful of values picked from a larger result
    (top-k scores), PyTorch's error is measured on that whole result instead: the maximum
    error of 70 values is too noisy a yardstick (on an AVX-512 machine PyTorch's top-7 error
    came out 3.5x below the error of its own full score matrix)."""
    rounded = copy.deepcopy(model).to(dtype)
    want = compute(copy.deepcopy(rounded).double())
    if baseline_compute is None:
        baseline = _max_relative(compute(rounded), want)
    else:
        whole = baseline_compute(copy.deepcopy(rounded).double())
        finite = torch.isfinite(whole)
        errors = (baseline_compute(rounded).double() - whole)[finite].abs()
        baseline = (errors.max() / want.abs().max()).item()
    error = _max_relative(got, want)
    assert error <= 2 * baseline + atol, (
        f"{dtype}: error {error:.3g} > 2 x PyTorch's {baseline:.3g} + {atol:g}"
    )


def _max_relative(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def check_against_reference(got, model, seqs, ids, dtype=torch.float32, atol=1e-6):
    """Scores ``got [B, N+1]`` in ``dtype`` against ``model.score`` by
    :func:`assert_rounding_like_pytorch`."""
    assert got.dtype == dtype and torch.isneginf(got[:, 0]).all()
    assert_rounding_like_pytorch(
        got[:, 1:], model, lambda m: reference(m, seqs, ids)[:, 1:], dtype, atol
    )


def load_bench(name, monkeypatch):
    """A fresh copy of benches/<name>.py (sys.path changes it makes are undone afterwards)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# A tiny training run for CLI and serving tests: 1 epoch of a 2x2x2 routing space, 1 thread.
TINY_ARGS = ["--max-len", "8", "--depths=[1,2]", "--hidden=[8,16]", "--emb=[8,16]",
             "--heads", "2", "--router-dim", "8", "--router-heads", "2", "--epochs", "1",
             "--batch-size", "32", "--progress", "false", "--threads", "1"]


def write_csv_log(path: Path, users: int = 40, items: int = 20, seed: int = 0) -> Path:
    """A seeded synthetic log written as CSV (user_id,item_id,timestamp) for CLI tests."""
    from canet.data import synthetic_log

    log = synthetic_log(users, items, seed, seq_len=(5, 12))
    rows = zip(log.users, log.items, log.timestamps, strict=True)
    path.write_text("user_id,item_id,timestamp\n"
                    + "".join(f"{u},{i},{int(t)}\n" for u, i, t in rows))
    return path


def train_tiny_run(data: Path, out: Path) -> Path:
    """``canet train --data data --out out`` with :data:`TINY_ARGS` (must succeed); ``out``."""
    from canet import cli

    assert cli.main(["train", "--data", str(data), "--out", str(out), *TINY_ARGS]) == 0
    return out


def cli_fails(capsys, argv) -> str:
    """Run ``canet argv`` in process; it must fail as every user error does: exit status 2,
    one stderr line ``canet: error: ...``, no traceback. Returns that line."""
    from canet import cli

    capsys.readouterr()  # drop what earlier steps printed
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canet: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]
