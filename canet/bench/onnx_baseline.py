"""ONNX Runtime baseline of ``canet bench --baselines ort``: what a user deploys instead of
routing, one fixed sub-network in ONNX Runtime.

Each config is exported on first use (:func:`canet.export.export_onnx`, the dynamo exporter,
dynamic batch) and run by an ``InferenceSession`` on the CPU provider with as many intra-op
threads as torch uses (inter-op 1, sequential execution: one request at a time, as the engine).
For a routed batch whose FLOPs are a fraction ``f`` of the all-largest batch, the baseline is
*the fixed sub-network of equal FLOPs*: the time of the two configs nearest in FLOPs below and
above ``f``, interpolated linearly in FLOPs (:func:`bracket`); ``ort_largest`` is the largest
config, the full-size model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..model import CANet

__all__ = ["ORT", "OrtSubnetworks", "bracket", "unavailable"]

ORT = "ort"  # the name of the baseline on the command line and in the reports


def unavailable() -> str | None:
    """Why the ORT baseline cannot run here (a missing package), or None."""
    for module, package in (("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                            ("onnxscript", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            return f"the package {package} is not installed: pip install 'canet[onnx]'"
    return None


def bracket(fractions: Sequence[float], target: float) -> tuple[int, int, float]:
    """The configs nearest in FLOPs below and above ``target`` (a FLOPs fraction) and the weight
    of the upper one in the linear interpolation: ``(lower, upper, w)`` with ``target = (1 - w)
    * fractions[lower] + w * fractions[upper]``. An exact match (or a target outside the range)
    gives ``lower == upper``, ``w = 0``. Ties in FLOPs go to the lower config id."""
    below = [c for c in range(len(fractions)) if fractions[c] <= target]
    above = [c for c in range(len(fractions)) if fractions[c] >= target]
    if not below:  # outside the range: the nearest end
        below = above = [min(range(len(fractions)), key=lambda c: (fractions[c], c))]
    elif not above:
        below = above = [max(range(len(fractions)), key=lambda c: (fractions[c], -c))]
    lower = max(below, key=lambda c: (fractions[c], -c))
    upper = min(above, key=lambda c: (fractions[c], c))
    if fractions[upper] == fractions[lower]:
        return lower, lower, 0.0
    return lower, upper, (target - fractions[lower]) / (fractions[upper] - fractions[lower])


class OrtSubnetworks:
    """ONNX Runtime sessions of ``model``'s fixed sub-networks, exported on first use into a
    temporary folder (removed by :meth:`close`)."""

    def __init__(self, model: CANet, threads: int, log: Callable[[str], None] = lambda _: None):
        import onnxruntime

        self._ort = onnxruntime
        self.model = model
        self.threads = threads
        self.log = log
        self.version = onnxruntime.__version__
        self._folder = tempfile.TemporaryDirectory(prefix="canet-bench-ort-")
        self._sessions: dict[int, object] = {}

    def session(self, config_id: int):
        if config_id not in self._sessions:
            from ..export import export_onnx

            path = Path(self._folder.name) / f"config{config_id}.onnx"
            self.log(f"  exporting config {config_id} to ONNX (dynamo exporter)")
            export_onnx(self.model, config_id, path, dynamo=True)
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[config_id] = self._ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[config_id]

    def call(self, config_id: int, seqs: Tensor) -> Callable[[], Tensor]:
        """A timed callable: the scores ``[B, N+1]`` of ``seqs`` ``[B, L]`` at ``config_id``
        (the numpy input is built once, outside the timed call; the output is wrapped, not
        copied)."""
        session = self.session(config_id)
        feed = {session.get_inputs()[0].name: seqs.numpy()}
        return lambda: torch.from_numpy(session.run(None, feed)[0])

    def close(self) -> None:
        self._sessions.clear()
        self._folder.cleanup()
