"""What this canet install has: ``python -m canet.info``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

__all__ = ["collect", "main"]


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, object]:
    """Facts about the install, as a dict of printable values (touches CUDA)."""
    import torch

    from canet import _ext
    from canet._version import __version__

    info: dict[str, object] = {
        "canet": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "triton": _triton_version(),
    }
    if _ext.available():
        build = _ext.build_info()
        info["extension"] = f"loaded from {_ext.path()}"
        info["cuda compiled in"] = "yes" if build.get("cuda") else "no"
    else:
        info["extension"] = f"not loaded: {_ext.reason()}"
        info["cuda compiled in"] = "n/a"
    for device_type in ("cpu", "cuda"):
        registered = [f"canet::{op}" for op in _ext.OPS if _ext.has_kernel(op, device_type)]
        missing = [f"canet::{op}" for op in _ext.OPS if not _ext.has_kernel(op, device_type)]
        text = ", ".join(registered) if registered else "none"
        if missing:
            text += f" (not registered: {', '.join(missing)})"
        info[f"{device_type.upper()} ops"] = text
    info["CPU threads"] = f"{torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["CUDA devices"] = "; ".join(f"{i}: {n}" for i, n in enumerate(names))
    else:
        info["CUDA devices"] = "none"
    return info


def main(argv: list[str] | None = None) -> int:
    """Print :func:`collect` as aligned ``key: value`` lines; returns the exit status."""
    del argv  # no options yet; the signature matches the other entry points
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
