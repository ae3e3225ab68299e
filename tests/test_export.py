"""canet.export: a fixed sub-network as a module, and its ONNX export run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canet import CANet, RoutingSpace
from canet.export import ONNX_INPUT, SubNetwork, export_onnx

SPACE = RoutingSpace(depths=(1, 2), hidden=(8, 16), emb=(8, 12), heads=2)


def _model(seed: int = 0) -> CANet:
    torch.manual_seed(seed)
    model = CANet(37, 7, space=SPACE, router_dim=8, router_heads=2)
    with torch.no_grad():  # non-trivial residual scales, or blocks are near identities
        for name, param in model.named_parameters():
            if "res_scale" in name:
                param.uniform_(0.5, 1.0)
    return model.eval()


def _seqs(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, 38, (batch, 7), generator=generator)
    for row in range(batch):  # left padding of every length, one full row
        seqs[row, : row % 7] = 0
    return seqs


@pytest.mark.parametrize("config_id", [0, 3, SPACE.n_configs - 1])
def test_subnetwork_equals_model_score_in_float64(config_id) -> None:
    model = _model().double()
    seqs = _seqs(9, 1)
    with torch.no_grad():
        got = SubNetwork(model, config_id)(seqs)
        want = model.score(seqs, torch.full((9,), config_id))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_subnetwork_refuses_a_bad_config() -> None:
    for bad in (-1, SPACE.n_configs, 1.0, True):
        with pytest.raises(ValueError, match=r"config_id must be an int in \[0, 7\]"):
            SubNetwork(_model(), bad)
    with pytest.raises(ValueError, match="needs a canet.CANet"):
        SubNetwork(torch.nn.Linear(2, 2), 0)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_round_trip_in_onnx_runtime(tmp_path, dynamo) -> None:
    """Export with either exporter, run in ONNX Runtime's CPU provider at batch sizes other
    than the traced one (1 and 13, with padding), compare with model.score."""
    ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: "
                              "pip install 'canet[onnx]'")
    pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'canet[onnx]'")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = _model(seed=2)
    config_id = 5
    path = export_onnx(model, config_id, tmp_path / "sub.onnx", dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 3), (13, 4)):
        seqs = _seqs(batch, seed)
        (got,) = session.run(None, {ONNX_INPUT: seqs.numpy()})
        with torch.no_grad():
            want = model.score(seqs, torch.full((batch,), config_id)).numpy()
        assert got.shape == want.shape == (batch, 38)
        assert np.isneginf(got[:, 0]).all()
        np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-5)


def test_export_leaves_the_mode_and_checks_its_inputs(tmp_path) -> None:
    pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'canet[onnx]'")
    model = _model().train()
    export_onnx(model, 0, tmp_path / "a.onnx", dynamo=False)
    assert model.training
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, 0, tmp_path / "missing" / "a.onnx", dynamo=False)
    with pytest.raises(ValueError, match="item ids"):
        export_onnx(model, 0, tmp_path / "b.onnx", dynamo=False,
                    example=torch.full((1, 7), 99))
