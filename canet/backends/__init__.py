"""Engine backends: which exist, which this install and device can run, and why not.

This is the one place backends are chosen. Each backend module defines ``Backend``, a subclass
of :class:`canet.backends.base.Backend` (the contract: ``route(seqs) -> [B]``,
``scores(seqs, plan) -> [B, N+1]`` with users in their original order, capability flags, and
``not_supported_reasons(device, dtype)``, empty when it can run there).
"""

from __future__ import annotations

import importlib
import warnings

import torch

from .base import Backend, BackendUnavailableError

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailableError", "availability", "backend_class", "create",
    "resolve",
]

BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton")
_MODULES = {
    "torch": "canet.backends.torch_backend",
    "cpu": "canet.backends.cpu_backend",
    "triton": "canet.backends.triton_backend",
}
# What "auto" tries, per device type, before falling back to torch.
_AUTO = {"cuda": ("triton",), "cpu": ("cpu",)}
_warned_fallback = False


def backend_class(name: str) -> type[Backend]:
    """The Backend class of ``name`` (one of :data:`BACKENDS`); imports its module only (triton
    itself is imported when a triton Backend is built)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return importlib.import_module(_MODULES[name]).Backend


def _why_not(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    reasons = backend_class(name).not_supported_reasons(device, dtype)
    return "; ".join(reasons) if reasons else None


def availability(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, str | None]:
    """Backend name -> None when usable on ``device`` (in ``dtype``, if given), else the
    reason it is not."""
    device = torch.device(device)
    return {name: _why_not(name, device, dtype) for name in BACKENDS}


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend to use for ``name`` ("auto" or one of :data:`BACKENDS`) on ``device``.

    "auto" picks triton on a GPU, cpu on a CPU, and falls back to torch with a one-time
    warning. An explicit name that cannot run (device, install or ``dtype``) raises
    BackendUnavailableError.
    """
    global _warned_fallback
    if name == "auto":
        reasons = {}
        for candidate in _AUTO.get(device.type, ()):
            reason = _why_not(candidate, device, dtype)
            if reason is None:
                return candidate
            reasons[candidate] = reason
        if not _warned_fallback:
            _warned_fallback = True
            details = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or (
                f"no other backend runs on {device.type} devices"
            )
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


def create(name: str, arch: dict, state: dict[str, torch.Tensor], device: torch.device) -> Backend:
    """Instantiate backend ``name`` (already resolved) over the canonical state_dict."""
    return backend_class(name)(arch, state, device)
