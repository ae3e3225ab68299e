"""The contract every engine backend implements, and the one refusal type.

A backend is a class (xformers-style) whose class attributes say what it can do, so the engine
and :mod:`canet.backends` read them instead of probing methods:

* ``NAME``: the name users pass to ``Engine(backend=...)``.
* ``DEVICE_TYPES``: the ``torch.device.type`` values it runs on (None: any), and
  ``DEVICE_HINT``, what to do on another device.
* ``DTYPES``: the compute dtypes it supports.
* ``PLANS_ON_DEVICE``: :meth:`Backend.scores_from_ids` builds the plan itself from config ids,
  without a host sync (the engine then never builds a plan for it).
* ``CAPTURABLE``: :meth:`Backend.capture` records a whole forward in one CUDA graph.
* ``LAST_HIDDEN``: :meth:`Backend.last_hidden` and :meth:`Backend.output_layer` give what the
  fused ``canet.ops.score_topk`` path needs.

:meth:`Backend.not_supported_reasons` says, for a device and dtype, every reason a backend
cannot run there (empty: usable); a backend refuses to be built with the same reasons, as one
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from ..budget import route_with_penalty
from ..errors import CanetError
from ..ops import Plan

__all__ = ["Backend", "BackendUnavailableError", "capture_cuda_graph", "dtype_name"]


class BackendUnavailableError(CanetError, RuntimeError):
    """A backend was asked for that this install or device cannot run; the message says why
    and how to get it."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


class Backend(ABC):
    """Base of the engine backends: routed inference over a CANet's canonical state_dict.

    Subclasses set the class attributes, implement :meth:`route` and :meth:`scores`, and the
    optional methods their capability flags promise (the defaults raise
    :class:`BackendUnavailableError` saying which backend lacks what).

    Args:
        arch: the model's ``CANet.arch`` dict.
        state: its ``state_dict()`` (the canonical schema); backends keep references to these
            tensors (no copies), so in-place updates of the model are seen.
        device: the tensors' device.
    """

    NAME: ClassVar[str] = ""
    DEVICE_TYPES: ClassVar[tuple[str, ...] | None] = ()
    DEVICE_HINT: ClassVar[str] = ""
    DTYPES: ClassVar[tuple[torch.dtype, ...]] = ()
    PLANS_ON_DEVICE: ClassVar[bool] = False
    CAPTURABLE: ClassVar[bool] = False
    LAST_HIDDEN: ClassVar[bool] = False

    # -- what it can run -------------------------------------------------------------------
    @classmethod
    def not_supported_reasons(
        cls, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> list[str]:
        """Every reason this backend cannot run on ``device`` (in ``dtype``, if given), each
        saying how to get it; empty when it can."""
        device = torch.device(device)
        reasons = []
        if cls.DEVICE_TYPES is not None and device.type not in cls.DEVICE_TYPES:
            reasons.append(cls._device_reason(device))
        reasons += cls._install_reasons(device)
        if dtype is not None and dtype not in cls.DTYPES:
            supported = ", ".join(dtype_name(d) for d in cls.DTYPES)
            reasons.append(
                f"the {cls.NAME} backend computes in {supported}, not {dtype_name(dtype)}; pass "
                "dtype=... to Engine or use backend='torch'"
            )
        return reasons

    @classmethod
    def _device_reason(cls, device: torch.device) -> str:
        """Why ``device`` (whose type is not in DEVICE_TYPES) is refused, and what to do."""
        types = "/".join(t.upper() for t in cls.DEVICE_TYPES or ())
        return (
            f"the {cls.NAME} backend runs on {types} tensors only, and the model is on "
            f"{device}; {cls.DEVICE_HINT}"
        )

    @classmethod
    def _install_reasons(cls, device: torch.device) -> list[str]:
        """What this install lacks for the backend (an extension, a package): none by default."""
        return []

    @classmethod
    def _build_reasons(cls, device: torch.device, dtype: torch.dtype) -> list[str]:
        """The reasons the constructor refuses: :meth:`not_supported_reasons` unless a
        backend builds where engines may not pick it (triton on CPU under its interpreter)."""
        return cls.not_supported_reasons(device, dtype)

    def __init__(self, arch: dict, state: dict[str, Tensor], device: torch.device) -> None:
        self.device = torch.device(device)
        self.dtype = state["supernet.out.weight"].dtype
        reasons = self._build_reasons(self.device, self.dtype)
        if reasons:
            raise BackendUnavailableError(
                f"backend {self.NAME!r} is unavailable on {self.device}: {'; '.join(reasons)}"
            )

    # -- every backend ---------------------------------------------------------------------
    @abstractmethod
    def router_logits(self, seqs: Tensor) -> Tensor:
        """Router logits ``[B, C]``. seqs ``[B, L]`` int64, validated by the caller."""

    def route(self, seqs: Tensor, penalty: Tensor | None = None) -> Tensor:
        """Argmax routing, minus a serve-time budget's ``penalty [C]`` (float64, from
        :meth:`canet.budget.RoutingPenalty.vector`; None: plain argmax). seqs ``[B, L]`` int64
        (validated by the caller) -> config ids ``[B]``. The one routing rule of every backend:
        :func:`canet.budget.route_with_penalty` on this backend's logits."""
        return route_with_penalty(self.router_logits(seqs), penalty)

    @abstractmethod
    def scores(self, seqs: Tensor, plan: Plan) -> Tensor:
        """Scores ``[B, N+1]`` (users in input order, column 0 = -inf) following ``plan``.
        seqs ``[B, L]`` int64, validated by the caller."""

    # -- by capability ---------------------------------------------------------------------
    def _lacks(self, what: str, flag: str) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the {self.NAME} backend has no {what} (its {flag} capability is off); "
            "canet.backends.availability() lists the backends this install can run"
        )

    def scores_from_ids(
        self, seqs: Tensor, config_ids: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """(PLANS_ON_DEVICE) Scores ``[B, N+1]`` with the plan built on the device from
        config ids ``[B]`` int64 (in range: not checked, that would sync); ``out`` is written
        when given."""
        raise self._lacks("device-side plan (scores_from_ids)", "PLANS_ON_DEVICE")

    def capture(
        self, batch_size: int, routed: bool = True, penalty: Tensor | None = None
    ) -> Callable[..., Tensor]:
        """(CAPTURABLE) The whole forward for ``batch_size`` users in one CUDA graph (routed
        with ``penalty``, as :meth:`route`)."""
        raise self._lacks("CUDA-graph capture", "CAPTURABLE")

    def last_hidden(self, seqs: Tensor, plan: Plan) -> Tensor:
        """(LAST_HIDDEN) The last position's hidden states ``[B, H]`` (input order), zero past
        each user's hidden size: :meth:`scores` without the output layer."""
        raise self._lacks("last_hidden", "LAST_HIDDEN")

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """(LAST_HIDDEN) The output layer's weight ``[N+1, H]`` and bias ``[N+1]``."""
        raise self._lacks("output_layer", "LAST_HIDDEN")


def capture_cuda_graph(
    step: Callable[[], object],
    device: torch.device | str | None = None,
    warmup: int = 2,
    inference_mode: bool = True,
) -> torch.cuda.CUDAGraph:
    """Record ``step`` (which reads and writes static tensors only) in one CUDA graph.

    It first runs ``warmup`` times on a side stream, which compiles kernels and allocates
    workspaces outside the capture (as torch.cuda.graphs' docs ask), then records one run.
    ``inference_mode``: run and record under ``torch.inference_mode()``. Replay with
    ``graph.replay()``.
    """
    device = torch.device("cuda") if device is None else torch.device(device)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side), torch.inference_mode(inference_mode):
        for _ in range(warmup):
            step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(inference_mode):
        step()
    return graph
