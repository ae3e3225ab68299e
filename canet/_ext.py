"""Lazy access to the native extension ``canet._C``.

Nothing is imported at ``import canet``: the extension is loaded on the first call to
:func:`load` (or anything built on it), and the reason of a failure is remembered so that
:func:`require` can say why it is missing and how to get it. Never touches CUDA.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import ModuleType

from .errors import CanetError

__all__ = [
    "ExtensionUnavailableError",
    "OPS",
    "available",
    "build_info",
    "has_kernel",
    "load",
    "path",
    "reason",
    "require",
]

# Operators the extension registers in the torch.ops.canet namespace.
OPS: tuple[str, ...] = (
    "plan", "routed_scores", "routed_last_hidden", "router_logits", "score_topk", "pack_panels"
)

_HOW_TO_GET = (
    "build it from a checkout with `pip install --no-build-isolation -e .` "
    "(or `make test`, which sets up .venv and builds it)"
)

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_reason: str | None = None


class ExtensionUnavailableError(CanetError, RuntimeError):
    """The native extension ``canet._C`` is needed but could not be loaded. A CanetError, so
    a command prints its one-line message (what needed it, why it is missing, how to get it)
    instead of a traceback."""


def _no_ext_requested() -> bool:
    return os.environ.get("CANET_NO_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")


def _built_files() -> list[Path]:
    here = Path(__file__).resolve().parent
    return sorted(here.glob("_C*.so")) + sorted(here.glob("_C*.pyd"))


def load() -> ModuleType | None:
    """Import ``canet._C`` on first use; returns the module, or None (see :func:`reason`)."""
    global _tried, _module, _reason
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if _no_ext_requested():
            _reason = "CANET_NO_EXT is set in the environment, so the extension is not loaded"
        else:
            try:
                import torch  # noqa: F401  (loads libtorch, which canet._C links against)

                _module = importlib.import_module("canet._C")
            except ModuleNotFoundError as exc:
                if exc.name == "canet._C" and not _built_files():
                    _reason = "canet._C is not built (no canet/_C*.so in this install)"
                else:
                    _reason = f"importing canet._C failed: {exc}"
            except ImportError as exc:
                _reason = f"importing canet._C failed: {exc}"
        _tried = True
    return _module


def available() -> bool:
    """True when the extension is loaded (loading it if not tried yet)."""
    return load() is not None


def reason() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    load()
    return _reason


def path() -> str | None:
    """File the extension was loaded from, or None."""
    mod = load()
    return getattr(mod, "__file__", None) if mod is not None else None


def build_info() -> dict:
    """``canet._C.build_info()`` ({'cuda': bool}), or {} without the extension."""
    mod = load()
    return dict(mod.build_info()) if mod is not None else {}


def require(what: str) -> ModuleType:
    """Return the extension, or raise ExtensionUnavailableError naming ``what`` needed it."""
    mod = load()
    if mod is None:
        raise ExtensionUnavailableError(
            f"{what} needs the native extension canet._C, which is unavailable: {_reason}. "
            f"To get it, {_HOW_TO_GET}."
        )
    return mod


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.canet.<op>`` has a kernel for ``device_type`` ('cpu', 'cuda')."""
    if load() is None:
        return False
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    import torch

    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"canet::{op}", key))
    except RuntimeError:  # the op is not registered at all
        return False
