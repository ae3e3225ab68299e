"""Build of canet and its native extension ``canet._C``.

Metadata lives in pyproject.toml; this file only decides which extension to build:

* ``CANET_NO_EXT=1``    -- no extension at all (canet then runs on its pure-PyTorch paths);
* ``CANET_FORCE_CUDA=1`` -- compile the ``.cu`` sources even when no toolkit/GPU torch is seen;
* otherwise CUDA sources are compiled when torch is a CUDA build and a toolkit is found.

``MAX_JOBS`` bounds the parallel compile jobs (read by torch's ninja build).
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = ROOT / "csrc" / "sources.txt"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def read_sources() -> list[str]:
    """Paths listed in csrc/sources.txt (shared with CMakeLists.txt), relative to the root."""
    sources = []
    for raw in SOURCES_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not (ROOT / line).is_file():
            raise FileNotFoundError(f"{SOURCES_FILE.name} lists {line!r}, which does not exist")
        sources.append(line)
    return sources


def build_ext_modules() -> tuple[list, dict]:
    if _flag("CANET_NO_EXT"):
        print("canet: CANET_NO_EXT is set, building no native extension")
        return [], {}

    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
    )

    sources = read_sources()
    with_cuda = _flag("CANET_FORCE_CUDA") or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    cxx_flags = ["-O3", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline in torch's headers: it forks only in translation units
        # compiled with OpenMP. libgomp.so.1 then resolves to the copy torch already loaded,
        # so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        ext = CUDAExtension(
            "canet._C",
            sources,
            define_macros=[("CANET_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "canet._C",
            [s for s in sources if not s.endswith(".cu")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"canet: building canet._C with{'' if with_cuda else 'out'} CUDA")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_ext_modules()

# canet.kernels (Triton sources) lives in kernels/ at the root; "canet" is listed explicitly so
# the build works even before canet/__init__.py exists in a checkout.
packages = sorted(set(find_packages(include=["canet", "canet.*"])) | {"canet", "canet.kernels"})

setup(
    packages=packages,
    package_dir={"canet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
