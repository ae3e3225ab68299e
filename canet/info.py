"""What this canet install has: ``python -m canet.info``."""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["collect", "main"]


def collect() -> dict[str, object]:
    """Facts about the install, as a dict of printable values (touches CUDA)."""
    import torch

    from canet import _ext, backends
    from canet._version import __version__
    from canet.backends.triton_backend import triton_version

    info: dict[str, object] = {
        "canet": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "triton": triton_version() or "not installed",
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
    # Every engine backend on each device this torch can use: "available", or why not.
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for name, why in backends.availability(device).items():
            info[f"backend {name} on {device}"] = "available" if why is None else f"no: {why}"
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
