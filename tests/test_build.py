"""Packaging and build checks: import hygiene, fallbacks, canet.info, CUDA and CMake sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    line.strip()
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_sources_list_exists_and_is_complete() -> None:
    assert SOURCES, "csrc/sources.txt lists no sources"
    for src in SOURCES:
        assert (ROOT / src).is_file(), f"csrc/sources.txt lists missing {src}"
    listed = set(SOURCES)
    on_disk = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in (".cpp", ".cu") and "tests" not in p.parts
    }
    assert on_disk == listed, f"sources not listed: {on_disk - listed}; stale: {listed - on_disk}"


def test_import_never_touches_cuda() -> None:
    assert_ok(
        run_python(
            """
            import torch
            import canet, canet.ops, canet.info, canet._ext
            assert not torch.cuda.is_initialized(), "importing canet initialised CUDA"
            assert "canet._C" not in __import__("sys").modules, "canet._C imported eagerly"
            assert "triton" not in __import__("sys").modules, "triton imported eagerly"
            """
        )
    )


def test_import_without_triton() -> None:
    assert_ok(
        run_python(
            """
            import sys
            sys.modules["triton"] = None  # any 'import triton' now raises ImportError
            import torch, canet, canet.ops
            ids = torch.tensor([3, 0, 3])
            table = torch.tensor([[2, 64, 64], [4, 64, 64], [2, 96, 64], [8, 96, 96]])
            p = canet.ops.plan(ids, table)
            assert p.order.tolist() == [0, 2, 1], p
            """
        )
    )


def test_without_extension_falls_back_and_explains() -> None:
    proc = run_python(
        """
        import sys
        sys.modules["canet._C"] = None
        import torch, canet, canet.ops
        from canet import _ext
        ids = torch.tensor([1, 0, 1])
        table = torch.tensor([[2, 64, 64], [4, 64, 64]])
        p = canet.ops.plan(ids, table)
        assert p.order.tolist() == [0, 2, 1] and p.layer_active.tolist() == [3, 3, 2, 2], p
        assert not _ext.available() and not _ext.has_kernel("plan", "cpu")
        try:
            _ext.require("the test")
        except RuntimeError as exc:
            assert isinstance(exc, _ext.ExtensionUnavailableError)
            print(exc)
        else:
            raise AssertionError("require() did not raise")
        """
    )
    assert_ok(proc)
    assert "the test needs the native extension canet._C" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout


def test_canet_no_ext_env_is_reported() -> None:
    proc = run_python(
        """
        from canet import _ext
        _ext.require("plan")
        """,
        CANET_NO_EXT="1",
    )
    assert proc.returncode != 0
    assert "ExtensionUnavailableError" in proc.stderr and "CANET_NO_EXT" in proc.stderr


def test_extension_loads_and_registers_plan() -> None:
    from canet import _ext

    if not _ext.available():
        pytest.skip(f"canet._C not built here: {_ext.reason()}")
    info = _ext.build_info()
    assert isinstance(info["cuda"], bool)
    assert all(_ext.has_kernel(op, "cpu") for op in _ext.OPS)
    import torch

    assert torch._C._dispatch_has_kernel_for_dispatch_key("canet::plan", "CPU")


def test_missing_extension_is_a_one_line_canet_error() -> None:
    # Commands print a CanetError as one line (``canet: error: ...``); any other exception
    # escapes as a traceback.
    proc = run_python(
        """
        from canet import _ext
        from canet.errors import CanetError
        try:
            _ext.require("the test")
        except CanetError as error:
            assert isinstance(error, RuntimeError)  # what it was before
            print("caught:", error)
        """,
        CANET_NO_EXT="1",
    )
    assert_ok(proc)
    assert "caught: the test needs the native extension canet._C" in proc.stdout
    assert "CANET_NO_EXT" in proc.stdout


def test_info_runs_and_names_plan() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "canet.info"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert_ok(proc)
    for word in ("canet", "torch", "triton", "extension", "CPU ops", "CUDA ops", "canet::plan"):
        assert word in proc.stdout, f"{word!r} missing from:\n{proc.stdout}"


def test_block_weight_order_of_the_native_op_is_block_params() -> None:
    # The native ops read a block's tensors by position; csrc/cpu/routed_forward.cpp names
    # them once (block_at's `names`, used in its shape errors) and canet.model.BLOCK_PARAMS is
    # what the cpu backend passes. Parse the C++ list from the source and compare.
    import re

    from canet.model import BLOCK_PARAMS

    source = (ROOT / "csrc" / "cpu" / "routed_forward.cpp").read_text()
    count = re.search(r"constexpr int64_t kTensorsPerBlock = (\d+);", source)
    names = re.search(r"static const char\* names\[kTensorsPerBlock\] = \{(.*?)\};", source, re.S)
    assert count and names, "routed_forward.cpp: kTensorsPerBlock or block_at's names not found"
    assert tuple(re.findall(r'"([^"]+)"', names.group(1))) == BLOCK_PARAMS
    assert int(count.group(1)) == len(BLOCK_PARAMS)
    # The op schema's comment in ops.cpp gives the same count.
    ops = (ROOT / "csrc" / "ops.cpp").read_text()
    assert f"{len(BLOCK_PARAMS)} per block" in ops and f"the {len(BLOCK_PARAMS)} block" in ops


def test_block_params_are_a_blocks_parameters() -> None:
    from canet.model import BLOCK_PARAMS, Block

    assert len(set(BLOCK_PARAMS)) == len(BLOCK_PARAMS) == 14
    assert set(BLOCK_PARAMS) == {name for name, _ in Block(8).named_parameters()}
    assert set(BLOCK_PARAMS) - {"res_scale1", "res_scale2"} == {
        name for name, _ in Block(8, residual_scaling=False).named_parameters()
    }


def test_version_is_single_sourced() -> None:
    from canet._version import __version__

    assert __version__ == "0.1.0"
    text = (ROOT / "pyproject.toml").read_text()
    assert 'attr = "canet._version.__version__"' in text


# --- CUDA sources ------------------------------------------------------------------------------

NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"], "bin", "nvcc")) if os.environ.get("CUDA_HOME") else None
)
needs_nvcc = pytest.mark.skipif(
    NVCC is None or not Path(NVCC).exists(), reason="nvcc not found (PATH or CUDA_HOME)"
)
NVCC_FLAGS = ["-c", "-std=c++17", "-arch=sm_90", "--Werror", "all-warnings"]
# Torch bindings: .cu files with a sibling <name>_kernel.cu; the rest must build without torch.
CU_BINDINGS = sorted(
    p for p in (ROOT / "csrc" / "cuda").glob("*.cu") if p.with_name(f"{p.stem}_kernel.cu").exists()
)
CU_KERNELS = sorted(set((ROOT / "csrc" / "cuda").glob("*.cu")) - set(CU_BINDINGS))


@needs_nvcc
@pytest.mark.parametrize("src", CU_KERNELS, ids=lambda p: p.name)
def test_cuda_kernel_compiles_without_torch(src: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [NVCC, *NVCC_FLAGS, str(src), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("src", CU_BINDINGS, ids=lambda p: p.name)
def test_cuda_binding_compiles_with_torch_headers(src: Path, tmp_path: Path) -> None:
    """A torch-facing binding (plan.cu, ...), compiled against this torch's headers.

    A CPU-only torch wheel ships the c10/cuda headers but not the CMake-generated
    c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in (what a CUDA build generates)
    lets the binding compile-check here. The object is never linked.
    """
    import torch
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [arg for p in include_paths() for arg in ("-isystem", p)]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        incs[:0] = ["-isystem", str(tmp_path / "stub")]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    proc = subprocess.run(
        [
            NVCC,
            *NVCC_FLAGS,
            abi,
            *incs,
            str(src),
            "-o",
            str(tmp_path / "b.o"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


# --- CMake (development build) -----------------------------------------------------------------


def test_sdist_carries_what_the_build_reads(tmp_path: Path) -> None:
    # A build from the sdist reads csrc/sources.txt and csrc/cuda_home.py and compiles every
    # listed source with its headers: all of csrc/ and CMakeLists.txt must be in it.
    # In a copy without build outputs: an existing *.egg-info/SOURCES.txt would fill the gaps.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs",
        ".hypothesis", ".benchmarks", ".pytest_cache", ".ruff_cache"))
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=tree, env={**os.environ, "CANET_NO_EXT": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()
              and p.suffix in (".txt", ".py", ".h", ".cuh", ".cpp", ".cu")}
    assert "csrc/sources.txt" in wanted and "csrc/cuda_home.py" in wanted
    assert not wanted - names, sorted(wanted - names)
    assert "CMakeLists.txt" in names


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_and_ctest_passes(tmp_path: Path) -> None:
    # The development build is not what pip uses, so only this test keeps it (and the C++ unit
    # test csrc/tests/test_plan.cpp) compiling: about 40 s on 2 cores.
    # The venv's bin first: its ninja (a build dependency) and cmake, when pip installed them.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"]) else []

    def run(*args: str) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run(
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path),
        *generator,
        f"-DPython3_EXECUTABLE={sys.executable}",
    )
    assert (tmp_path / "compile_commands.json").exists()
    assert "Torch_DIR" in (tmp_path / "CMakeCache.txt").read_text()
    run("cmake", "--build", str(tmp_path), "--parallel", os.environ.get("MAX_JOBS", "2"))
    run("ctest", "--test-dir", str(tmp_path), "--output-on-failure")
