#!/usr/bin/env bash
# One command for a bare GPU machine (torch + triton preinstalled, no network):
#
#   1. environment: versions, CUDA, nvcc, CUDA_HOME, setuptools, pytest/hypothesis (recorded);
#   2. build the CUDA extension (pip install --no-build-isolation --no-deps -e .), falling back
#      to CANET_NO_EXT=1 if that fails (so that the Triton steps still run), then canet.info;
#   3. the GPU tests (pytest -m "gpu and not slow" over the modules that hold them);
#   4. the GPU benchmark (benches/gpu_bench.py): <results>/<date>-<gpu>.{json,md};
#   5. the op micro-benchmark (benches/bench_ops_gpu.py): <results>/<date>-<gpu>-ops.{json,md};
#   6. the training benchmark (canet bench --train --device cuda: CANet and the full-size model,
#      B=128, L=50, N~24k, fp32 vs bf16, new vs old step): <results>/<date>-<gpu>-train.{json,md};
#   7. the distributed training benchmark with one rank (canet bench --train --nproc 1 --device
#      cuda: one process vs one DDP rank over NCCL, 3,000 users, 10 steps; proves the NCCL path
#      initialises): <results>/<date>-<gpu>-train-ddp.{json,md};
#   8. compute-sanitizer memcheck over one plan and one score_topk (pytest -m "gpu and slow").
#
# No step stops the others. Each runs under `timeout -k 10` with its own limit (environment
# 40 s, build 150, canet.info 20, tests 100, op benchmark 35, training benchmark 60, DDP
# training benchmark 45, sanitizer 60; the GPU benchmark gets whatever the earlier steps left
# of CHECK_BUDGET_S, 480 s by default, well inside a 600 s command limit, less the later
# steps' limits), and its name,
# exit status and seconds are recorded. On exit, whatever happened, the summary is written to
# <results>/<date>-<gpu>-check.{json,md}, the whole output is in <date>-<gpu>-check.log, the
# step table is printed last, and the exit status is 1 if any step failed or could not run.
#
# The CPU part of the suite is not run here: CI runs it on the CPU machines, and its only
# tests that need this machine's toolkit (tests/test_build.py's nvcc compiles) are slow and
# check warnings, not the GPU code paths; step 2 compiles the same CUDA sources.
#
# <results> is $RESULTS_DIR, else $OUT (the device tool brings back only files under $OUT; the
# session then copies the files into benches/results/ and commits them), else benches/results.
#
# Usage: bash benches/gpu_check.sh [--dry-run]
#   --dry-run  on any machine: the environment step and the benchmarks' --dry-run only (no
#              build, no tests); results go to $RESULTS_DIR or $OUT or /tmp/canet-gpu-check.
# Environment: PYTHON (default python3), RESULTS_DIR, OUT, CHECK_BUDGET_S, MAX_JOBS (default 8).
set -uo pipefail  # no -e: a failing step is recorded, and the next one runs
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# The scripts in benches/ import canet (canet.bench) without editing sys.path: put the checkout
# first, as `python -m pytest` and `python -m canet.info` do with the working directory. So
# the dry run (nothing installed) works, and canet.kernels still comes from the editable
# install's mapping once step 2 has run.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash benches/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
export MAX_JOBS="${MAX_JOBS:-8}"
# PIP_BREAK_SYSTEM_PACKAGES: a distro python marked externally managed (PEP 668) would refuse
# the editable install, and without it canet.kernels does not exist.
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_BREAK_SYSTEM_PACKAGES=1
BUDGET_S="${CHECK_BUDGET_S:-480}"
KILL_GRACE=10  # timeout -k: SIGKILL this long after SIGTERM (a hung CUDA call ignores TERM)
MIN_STEP_S=15  # a step that would get less than this is not started
START=$SECONDS
STAMP=$(date +%Y%m%d-%H%M%S)

DRY_NOTE=""
if ((DRY_RUN)); then
  DRY_NOTE="dry run"
  RESULTS="${RESULTS_DIR:-${OUT:-${TMPDIR:-/tmp}/canet-gpu-check}}"
else
  RESULTS="${RESULTS_DIR:-${OUT:-benches/results}}"
fi
mkdir -p "$RESULTS" || exit 1

# The device name as a file-name piece (same rule as gpu_bench.slug).
GPU_NAME=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [[ -z "$GPU_NAME" ]]; then
  GPU_NAME=$(timeout 60 "$PYTHON" -c 'import torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
fi
GPU_NAME="${GPU_NAME:-no-gpu}"
GPU=$(printf '%s' "$GPU_NAME" | sed -E 's/^[[:space:]]+|[[:space:]]+$//g; s/[^A-Za-z0-9._-]+/_/g')
NAME="$STAMP-${GPU:-unknown}"
BASE="$RESULTS/$NAME"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/canet-gpu-check.XXXXXX") || exit 1

exec 3>&1 4>&2
exec > >(tee -a "$BASE-check.log") 2>&1
TEE_PID=$!

STEP_NAMES=()
STEP_RCS=()
STEP_SECS=()
STEP_STATUS=()
STEP_NOTES=()

record() {  # name rc seconds status note
  STEP_NAMES+=("$1")
  STEP_RCS+=("$2")
  STEP_SECS+=("$3")
  STEP_STATUS+=("$4")
  STEP_NOTES+=("$5")
  echo "== $1: $4 (rc $2, $3 s)${5:+: $5}"
}

step_limit() {  # cap -> the limit a step starting now gets (the budget's remainder at most)
  local left=$((BUDGET_S - (SECONDS - START) - KILL_GRACE))
  echo $(($1 < left ? $1 : left))
}

run_step() {  # name limit command...: run it under timeout and record the outcome
  local name=$1 limit=$2
  shift 2
  if ((limit < MIN_STEP_S)); then
    record "$name" -1 0 "not run" "only ${limit} s of the ${BUDGET_S} s budget left"
    return 1
  fi
  echo
  echo "== $name (limit ${limit} s, $(date +%T))"
  echo "\$ $*"
  local t0=$SECONDS rc status note=""
  timeout -k "$KILL_GRACE" "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout note="stopped at its ${limit} s limit" ;;
    *) status=failed ;;
  esac
  record "$name" "$rc" "$((SECONDS - t0))" "$status" "$note"
  return "$rc"
}

# shellcheck disable=SC2317  # json_str and finish run from the EXIT trap
json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/ }
  s=${s//$'\r'/}
  printf '"%s"' "$s"
}

# shellcheck disable=SC2317
finish() {
  local rc_self=$? i failed=0 env_json=null
  trap - EXIT INT TERM
  for i in "${!STEP_STATUS[@]}"; do
    case ${STEP_STATUS[$i]} in ok | skipped) ;; *) failed=1 ;; esac
  done
  ((${#STEP_STATUS[@]})) || failed=1
  [[ -s "$WORK/env.json" ]] && env_json=$(cat "$WORK/env.json")
  {
    printf '{\n  "name": %s,\n  "gpu": %s,\n  "date": %s,\n  "dry_run": %s,\n' \
      "$(json_str "$NAME")" "$(json_str "$GPU_NAME")" "$(json_str "$(date -Iseconds)")" \
      "$( ((DRY_RUN)) && echo true || echo false)"
    printf '  "python": %s,\n  "budget_s": %s,\n  "seconds": %s,\n  "ok": %s,\n' \
      "$(json_str "$PYTHON")" "$BUDGET_S" "$((SECONDS - START))" \
      "$( ((failed)) && echo false || echo true)"
    printf '  "files": {"bench": %s, "ops": %s, "train": %s, "train_ddp": %s, "log": %s},\n' \
      "$(json_str "$NAME.json")" "$(json_str "$NAME-ops.json")" "$(json_str "$NAME-train.json")" \
      "$(json_str "$NAME-train-ddp.json")" "$(json_str "$NAME-check.log")"
    printf '  "environment": %s,\n  "steps": [' "$env_json"
    for i in "${!STEP_NAMES[@]}"; do
      ((i)) && printf ','
      printf '\n    {"name": %s, "status": %s, "rc": %s, "seconds": %s, "note": %s}' \
        "$(json_str "${STEP_NAMES[$i]}")" "$(json_str "${STEP_STATUS[$i]}")" \
        "${STEP_RCS[$i]}" "${STEP_SECS[$i]}" "$(json_str "${STEP_NOTES[$i]}")"
    done
    printf '\n  ]\n}\n'
  } >"$BASE-check.json"
  {
    echo "# canet GPU check $NAME ($( ((failed)) && echo FAILED || echo ok))"
    echo
    echo "$GPU_NAME; $((SECONDS - START)) s of a ${BUDGET_S} s budget${DRY_NOTE:+; $DRY_NOTE}."
    echo
    echo "| step | status | rc | seconds | note |"
    echo "|---|---|---:|---:|---|"
    for i in "${!STEP_NAMES[@]}"; do
      printf '| %s | %s | %s | %s | %s |\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" \
        "${STEP_RCS[$i]}" "${STEP_SECS[$i]}" "${STEP_NOTES[$i]//|//}"
    done
  } >"$BASE-check.md"
  echo
  for f in "$BASE.md" "$BASE-ops.md" "$BASE-train.md" "$BASE-train-ddp.md"; do
    [[ -f "$f" ]] && cat "$f" && echo
  done
  echo "files in $RESULTS:"
  for i in "$BASE"*; do
    [[ -e "$i" ]] && echo "  ${i##*/}"
  done
  echo
  cat "$BASE-check.md"
  ((rc_self == 0)) || echo "(gpu_check.sh itself exited with $rc_self)"
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null
  rm -rf "$WORK"
  ((failed || rc_self)) && exit 1
  exit 0
}
trap finish EXIT
trap 'echo "gpu_check.sh: interrupted"; exit 130' INT TERM

echo "canet GPU check $NAME: python $PYTHON, results in $RESULTS," \
  "budget ${BUDGET_S} s${DRY_NOTE:+, $DRY_NOTE}"

# -- 1. environment -------------------------------------------------------------------------
cat >"$WORK/env.py" <<'PY'
"""Print and record what this machine has; exit 1 if the GPU steps cannot work."""
import importlib, json, os, platform, shlex, shutil, subprocess, sys, warnings

warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")

facts, problems = {"python": sys.executable, "python_version": platform.python_version()}, []


def probe(key, fn):
    try:
        facts[key] = fn()
    except Exception as exc:  # recorded, never fatal here
        facts[key] = f"ERROR {type(exc).__name__}: {exc}"


def run(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    return (out.stdout or out.stderr).strip()


def version(module):
    return importlib.import_module(module).__version__


probe("torch", lambda: version("torch"))
probe("torch_cuda", lambda: __import__("torch").version.cuda)
probe("cuda_available", lambda: __import__("torch").cuda.is_available())
if facts["cuda_available"] is True:
    import torch

    probe("gpu", lambda: torch.cuda.get_device_name())
    probe("capability", lambda: ".".join(map(str, torch.cuda.get_device_capability())))
    probe("sms", lambda: torch.cuda.get_device_properties(0).multi_processor_count)
    probe("gpu_memory_gib",
          lambda: round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
probe("triton", lambda: version("triton"))
probe("nvcc", lambda: shutil.which("nvcc"))
if shutil.which("nvcc"):
    probe("nvcc_version", lambda: run("nvcc", "--version").splitlines()[-1])
probe("cuda_home", lambda: importlib.import_module("torch.utils.cpp_extension").CUDA_HOME)
probe("compute_sanitizer", lambda: shutil.which("compute-sanitizer"))
if shutil.which("nvidia-smi"):
    probe("nvidia_smi", lambda: run("nvidia-smi", "--format=csv,noheader",
                                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm"))
probe("setuptools", lambda: version("setuptools"))
probe("wheel", lambda: version("wheel"))  # setuptools < 70.1 needs it for bdist_wheel
probe("pip", lambda: version("pip"))
probe("ninja", lambda: shutil.which("ninja"))
probe("pybind11", lambda: version("pybind11"))
probe("pytest", lambda: version("pytest"))
probe("hypothesis", lambda: version("hypothesis"))
facts["env"] = {k: os.environ.get(k)
                for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME", "TRITON_CACHE_DIR")}
for key, value in facts.items():
    print(f"  {key:18} {value}")


def bad(key):
    return facts.get(key) in (None, False) or str(facts.get(key)).startswith("ERROR")


dry = os.environ.get("CANET_CHECK_DRY_RUN") == "1"
for key, why in (("torch", "torch does not import"), ("cuda_available", "no CUDA device visible"),
                 ("triton", "triton does not import"), ("pytest", "pytest does not import"),
                 ("hypothesis", "hypothesis does not import (tests/test_plan.py needs it)"),
                 ("nvcc", "no nvcc on PATH: the extension builds without its CUDA kernels")):
    if bad(key) and not (dry and key in ("cuda_available", "nvcc")):
        problems.append(why)
facts["problems"] = problems
with open(sys.argv[1], "w") as f:
    json.dump(facts, f, indent=2, default=str)
with open(sys.argv[2], "w") as f:  # flags for the shell
    f.write(f"CUDA_OK={int(facts['cuda_available'] is True)}\n")
    f.write(f"TORCH_OK={int(not bad('torch'))}\n")
    f.write(f"PYTEST_OK={int(not bad('pytest'))}\n")
    f.write(f"ENV_PROBLEMS={shlex.quote('; '.join(problems))}\n")
for why in problems:
    print(f"PROBLEM: {why}")
sys.exit(1 if problems else 0)
PY
CUDA_OK=0 TORCH_OK=0 PYTEST_OK=0 ENV_PROBLEMS=""
CANET_CHECK_DRY_RUN=$DRY_RUN run_step "environment" "$(step_limit 40)" \
  "$PYTHON" "$WORK/env.py" "$WORK/env.json" "$WORK/flags.sh"
# shellcheck disable=SC1091
[[ -f "$WORK/flags.sh" ]] && source "$WORK/flags.sh"
[[ -n "$ENV_PROBLEMS" ]] && STEP_NOTES[0]=$ENV_PROBLEMS

# Why a step cannot run here (empty: it can). GPU steps need torch with CUDA.
blocker() {  # needs: "torch" | "cuda" | "cuda pytest"
  ((TORCH_OK)) || { echo "torch does not import"; return; }
  [[ $1 == torch ]] && return
  ((CUDA_OK)) || { echo "no CUDA device"; return; }
  [[ $1 == *pytest* ]] && ! ((PYTEST_OK)) && echo "pytest does not import"
}

gated_step() {  # needs name cap command...: run_step unless a blocker (or the dry run) stops it
  local needs=$1 name=$2 cap=$3 why
  shift 3
  why=$(blocker "$needs")
  if [[ -n "$why" ]]; then
    record "$name" -1 0 "not run" "$why"
    return 1
  fi
  run_step "$name" "$(step_limit "$cap")" "$@"
}

if ((DRY_RUN)); then
  # -- dry run: nothing is built, tested or timed --------------------------------------------
  for name in build "GPU tests" "compute-sanitizer"; do
    record "$name" -1 0 skipped "dry run"
  done
  gated_step torch "GPU benchmark --dry-run" 60 "$PYTHON" benches/gpu_bench.py --dry-run
  gated_step torch "op micro-benchmark --dry-run" 60 \
    "$PYTHON" benches/bench_ops_gpu.py --dry-run --out "$RESULTS" --name "$NAME-ops"
  gated_step torch "training benchmark (tiny, on CPU)" 60 \
    "$PYTHON" -m canet.bench --train --users 40 --items 30 --steps 1 --old-steps 1 \
    --out "$RESULTS/$NAME-train.json"
  gated_step torch "DDP training benchmark (tiny, on CPU: gloo)" 60 \
    "$PYTHON" -m canet.bench --train --nproc 1 --users 40 --items 30 --steps 1 \
    --out "$RESULTS/$NAME-train-ddp.json"
  exit 0  # finish (the EXIT trap) decides the status
fi

# -- 2. build -------------------------------------------------------------------------------
if ! gated_step cuda "build (pip install --no-build-isolation --no-deps -e .)" 150 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  if [[ -z "$(blocker cuda)" ]]; then
    # Without the extension the Triton backend and the PyTorch paths still run.
    CANET_NO_EXT=1 gated_step cuda "fallback build without the extension (CANET_NO_EXT=1)" 45 \
      "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
  fi
fi
gated_step torch "canet.info" 20 "$PYTHON" -m canet.info

# -- 3. GPU tests ---------------------------------------------------------------------------
# Only the modules that hold GPU tests: collecting all of tests/ would import modules whose
# dependencies (numpy, safetensors, ...) this image need not have, and a collection error makes
# pytest exit 1 even when every GPU test passes.
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
echo "GPU test modules: ${GPU_TEST_FILES[*]}"
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider --continue-on-collection-errors)
gated_step "cuda pytest" "GPU tests (pytest -m 'gpu and not slow')" 100 \
  "${PYTEST[@]}" -v -m "gpu and not slow" --durations=15 "${GPU_TEST_FILES[@]}"

# -- 4, 5. benchmarks -----------------------------------------------------------------------
# The GPU benchmark gets what the earlier steps left, less what the four later steps need.
LATER_STEPS_S=$((35 + 60 + 45 + 60 + 5 * KILL_GRACE))  # their limits and the five kill graces
limit=$(step_limit $((BUDGET_S - (SECONDS - START) - LATER_STEPS_S)))
gated_step cuda "GPU benchmark (benches/gpu_bench.py)" "$limit" \
  "$PYTHON" benches/gpu_bench.py --budget-s "$((limit > 50 ? limit - 40 : 10))" \
  --out "$RESULTS" --name "$NAME"
gated_step cuda "op micro-benchmark (benches/bench_ops_gpu.py)" 35 \
  "$PYTHON" benches/bench_ops_gpu.py --out "$RESULTS" --name "$NAME-ops"

# -- 6. training throughput -----------------------------------------------------------------
gated_step cuda "training benchmark (canet bench --train --device cuda)" 60 \
  "$PYTHON" -m canet.bench --train --device cuda --precision fp32,bf16 --steps 20 \
  --old-steps 3 --out "$RESULTS/$NAME-train.json"

# -- 7. distributed training: one DDP rank over NCCL vs one process ---------------------------
gated_step cuda "DDP training benchmark (canet bench --train --nproc 1 --device cuda)" 45 \
  "$PYTHON" -m canet.bench --train --nproc 1 --device cuda --users 3000 --steps 10 \
  --out "$RESULTS/$NAME-train-ddp.json"

# -- 8. compute-sanitizer -------------------------------------------------------------------
# The test's own timeout stays under the step's, so that a slow run reports what it printed.
limit=$(step_limit 60)
CANET_SANITIZER_TIMEOUT_S=$((limit > 30 ? limit - 15 : 15)) gated_step "cuda pytest" \
  "compute-sanitizer memcheck (pytest -m 'gpu and slow')" "$limit" \
  "${PYTEST[@]}" -q -m "gpu and slow" "${GPU_TEST_FILES[@]}"
exit 0  # finish (the EXIT trap) decides the status
