"""Which CUDA toolkit to build against: shared by setup.py (imported) and CMakeLists.txt (run as
``python csrc/cuda_home.py``, which prints the root or nothing).

torch.utils.cpp_extension takes ``CUDA_HOME``/``CUDA_PATH``, else the grandparent of the
``nvcc`` on PATH. When that ``nvcc`` is a wrapper script outside the toolkit (for example
/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), the guess (/usr/local) is no
toolkit and the link fails on ``-lcudart``; nvcc itself names its real root in ``--dryrun``
output (``#$ TOP=...``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def is_toolkit_root(root: Path) -> bool:
    """A toolkit root: the runtime library (any version) and its header."""
    lib_dirs = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    include_dirs = [root / "include", *root.glob("targets/*/include")]
    return any(any(d.glob("libcudart.so*")) for d in lib_dirs) and any(
        (d / "cuda_runtime.h").exists() for d in include_dirs
    )


def toolkit_behind_nvcc_wrapper() -> Path | None:
    """The toolkit the ``nvcc`` on PATH runs, when torch's guess from it is no toolkit root;
    None when CUDA_HOME or CUDA_PATH is set, when there is no nvcc, or when the guess is fine."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None or is_toolkit_root(Path(nvcc).resolve().parent.parent):
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if top is None:
        return None
    root = Path(top.group(1).strip()).resolve()
    return root if is_toolkit_root(root) else None


def cuda_home() -> str | None:
    """The toolkit root torch's extension builder will use once the wrapper is followed."""
    root = toolkit_behind_nvcc_wrapper()
    if root is not None:
        return str(root)
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


if __name__ == "__main__":
    print(cuda_home() or "")
