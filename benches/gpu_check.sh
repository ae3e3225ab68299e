#!/usr/bin/env bash
# One command for a bare GPU machine (torch + triton preinstalled, no network): build the CUDA
# extension, run the GPU tests and the rest of the suite, then the GPU benchmark, whose table
# is printed, written to benches/results/<date>-<gpu>.{json,md}, then the op micro-benchmark
# (<date>-<gpu>-ops.{json,md}).
# Budget: about 8 minutes on an H100 (each step is bounded by `timeout`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-8}"
export PYTHONUNBUFFERED=1

step() { echo; echo "== $* ($(date +%T))"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "environment"
"$PYTHON" - <<'PY' || fail "torch with CUDA and triton are required"
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name())
PY

step "build (pip install --no-build-isolation --no-deps -e .)"
timeout 240 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
  || fail "building canet (CUDA extension) failed"

step "GPU tests (pytest -m gpu)"
timeout 150 "$PYTHON" -m pytest -q -x -m gpu -p no:cacheprovider || fail "GPU tests failed"

step "the rest of the suite (pytest -m 'not gpu and not interpreter')"
timeout 120 "$PYTHON" -m pytest -q -x -m "not gpu and not interpreter" -p no:cacheprovider \
  || fail "CPU tests failed on the GPU machine"

step "GPU benchmark (benches/gpu_bench.py)"
timeout 240 "$PYTHON" benches/gpu_bench.py --budget-s 180 || fail "benchmark failed"

step "op micro-benchmark (benches/bench_ops_gpu.py: plan, score_topk)"
timeout 120 "$PYTHON" benches/bench_ops_gpu.py || fail "op micro-benchmark failed"
