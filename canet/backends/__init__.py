"""Engine backends: which exist, which this install and device can run, and why not.

This is the one place backends are chosen. Each backend module exposes a class with
``route(seqs) -> [B]`` and ``scores(seqs, plan) -> [B, N+1]`` (users in their original order),
a ``requirements(device)`` function returning None when it can run, else the reason and how to
get it, and ``DTYPES``, the compute dtypes it supports.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from ..errors import CanetError

__all__ = ["BACKENDS", "BackendUnavailableError", "availability", "resolve", "create"]

BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": "canet.backends.torch_backend",
    "cpu": "canet.backends.cpu_backend",
    "triton": "canet.backends.triton_backend",
    "cuda": "canet.backends.cuda_backend",
}
_warned_fallback = False


class BackendUnavailableError(CanetError, RuntimeError):
    """A backend was asked for that this install or device cannot run; the message says why
    and how to get it."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _why_not(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name != _MODULES[name]:
            raise
        return f"the {name} backend is not implemented in this version of canet yet"
    reason = module.requirements(device)
    if reason is None and dtype is not None and dtype not in module.DTYPES:
        supported = ", ".join(_dtype_name(d) for d in module.DTYPES)
        reason = (
            f"the {name} backend computes in {supported}, not {_dtype_name(dtype)}; pass "
            "dtype=... to Engine or use backend='torch'"
        )
    return reason


def availability(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, str | None]:
    """Backend name -> None when usable on ``device`` (in ``dtype``, if given), else the
    reason it is not."""
    device = torch.device(device)
    return {name: _why_not(name, device, dtype) for name in BACKENDS}


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend to use for ``name`` ("auto" or one of :data:`BACKENDS`) on ``device``.

    "auto" picks cuda, then triton on a GPU, cpu on a CPU, and falls back to torch with a
    one-time warning. An explicit name that cannot run (device, install or ``dtype``) raises
    BackendUnavailableError.
    """
    global _warned_fallback
    if name == "auto":
        preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        reasons = {}
        for candidate in preferred:
            reason = _why_not(candidate, device, dtype)
            if reason is None:
                return candidate
            reasons[candidate] = reason
        if not _warned_fallback:
            _warned_fallback = True
            details = "; ".join(f"{k}: {v}" for k, v in reasons.items())
            warnings.warn(
                f"canet.Engine: falling back to the pure-PyTorch backend ({details})",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    reason = _why_not(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device}: {reason}")
    return name


def create(name: str, arch: dict, state: dict[str, torch.Tensor], device: torch.device):
    """Instantiate backend ``name`` (already resolved) over the canonical state_dict."""
    module = importlib.import_module(_MODULES[name])
    return module.Backend(arch, state, device)
