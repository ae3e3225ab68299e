"""One fixed sub-network of a CANet as a standalone model, and its ONNX export.

    net = canet.export.SubNetwork(model, config_id)       # seqs [B, L] -> scores [B, N+1]
    canet.export.export_onnx(model, config_id, "c13.onnx")  # dynamic batch, ONNX Runtime-ready

What a user deploys when one architecture is enough (and what ``canet bench --baselines ort``
runs in ONNX Runtime to compare the routed engine with): the sub-network's prefix slices of the
supernet's weights, the last position only (the final block's queries, FFN and norms on the
last row, as every engine backend does), column 0 (padding) of the scores -inf. Both of
torch's exporters work (``dynamo=True``, the default, needs the ``onnxscript`` package;
``dynamo=False`` is the TorchScript exporter); the graph holds the full-size weights' slices
as constants, so the file is about the sub-network's size.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .checks import check_sequences
from .model import CANet

__all__ = ["SubNetwork", "export_onnx", "ONNX_INPUT", "ONNX_OUTPUT"]

ONNX_INPUT = "seqs"  # int64 [batch, L], left-padded item ids
ONNX_OUTPUT = "scores"  # float [batch, N+1]


class SubNetwork(nn.Module):
    """Config ``config_id`` of ``model`` as a plain module: ``forward(seqs)`` = scores equal to
    ``model.score(seqs, full(config_id))`` (shares ``model``'s weights, no copy)."""

    def __init__(self, model: CANet, config_id: int) -> None:
        super().__init__()
        if not isinstance(model, CANet):
            raise ValueError(f"SubNetwork needs a canet.CANet, got {type(model).__name__}")
        n_configs = model.space.n_configs
        if isinstance(config_id, bool) or not isinstance(config_id, int) or not (
            0 <= config_id < n_configs
        ):
            raise ValueError(f"config_id must be an int in [0, {n_configs - 1}], got "
                             f"{config_id!r}")
        self.supernet = model.supernet
        self.config_id = config_id
        self.config = model.space.configs[config_id]

    def forward(self, seqs: Tensor) -> Tensor:
        """seqs ``[B, L]`` int64 left-padded item ids (not validated: exporters trace this)
        -> scores ``[B, N+1]``, column 0 -inf."""
        return self.supernet.logits(self.supernet.last_hidden(seqs, self.config))


def export_onnx(
    model: CANet,
    config_id: int,
    path: str | os.PathLike[str],
    *,
    dynamo: bool = True,
    example: Tensor | None = None,
) -> Path:
    """Write config ``config_id`` of ``model`` to ``path`` as ONNX: input ``seqs`` int64
    ``[batch, L]`` (batch dynamic), output ``scores`` ``[batch, N+1]`` in the model's dtype.

    ``dynamo``: torch's dynamo-based exporter (needs ``onnxscript``) or the TorchScript one.
    ``example``: the sequences traced (default: two seeded full-length histories).
    Returns ``path`` as a Path; the model is left in its mode (the export runs in eval mode).
    """
    net = SubNetwork(model, config_id)
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"export_onnx: the folder {str(path.parent)!r} does not exist")
    if example is None:
        generator = torch.Generator().manual_seed(0)
        example = torch.randint(1, model.num_items + 1, (2, model.max_len), generator=generator)
    else:
        example = check_sequences(example, model.num_items, model.max_len)
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ImportError("export_onnx(dynamo=True) needs the package onnxscript: "
                              "pip install 'canet[onnx]' (or pass dynamo=False)") from None
    was_training = model.training
    model.eval()
    try:
        # The dynamo exporter prints its progress to stdout: a library call stays quiet.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            if dynamo:
                batch = torch.export.Dim("batch")
                torch.onnx.export(net, (example,), str(path), dynamo=True,
                                  input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                  dynamic_shapes=({0: batch},), verbose=False)
            else:
                torch.onnx.export(net, (example,), str(path), dynamo=False,
                                  input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                  dynamic_axes={ONNX_INPUT: {0: "batch"},
                                                ONNX_OUTPUT: {0: "batch"}})
    finally:
        model.train(was_training)
    return path
