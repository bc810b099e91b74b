#!/usr/bin/env bash
# shellcheck disable=SC2329 # the step functions run through `bash -c`, exported
# The GPU check, for a machine with one CUDA GPU (an H100 or H200 in mind) and no network: in about
# 9 minutes it
#   1. builds lowbit._C for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS = cores) into the editable
#      install, and checks that the CUDA kernels loaded;
#   2. runs the GPU tests (pytest -m gpu) with Triton compiling for the GPU, junit XML kept;
#   3. runs compute-sanitizer's memcheck, racecheck and synccheck on scripts/gpu_sanitize.py, which
#      calls every CUDA and Triton op once on small inputs;
#   4. runs the GPU benchmarks (CUDA graphs over weight copies larger than L2, baselines in the same
#      process), which write bench/results/<date>_<device>.json.
# Every step has its own time limit, and all of them together stay within LOWBIT_GPU_CHECK_BUDGET
# seconds; a step that fails or times out does not stop the next. It ends with a table of the steps
# and exits non-zero when any of them failed.
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from anywhere
#   bash scripts/gpu_check.sh --dry-run    # without a GPU: builds nothing, checks each step's command
#                                          # on the CPU (tests collected and skipped, the sanitizer
#                                          # driver on CPU tensors, the benchmarks --quick on the CPU)
#
# Logs and results go to $OUT (default build/gpu_check): gpu_check.log (everything), summary.txt,
# gpu_tests.xml, sanitize_<tool>.log and a copy of the results JSON.
# Environment: PYTHON (default python3), OUT, COMPUTE_SANITIZER (its path, default found on PATH
# or in /usr/local/cuda/bin), LOWBIT_GPU_CHECK_DRY_RUN=1 (as --dry-run),
# LOWBIT_GPU_CHECK_BUDGET (seconds, default 540), LOWBIT_GPU_TESTS (pytest selection, default -m gpu),
# LOWBIT_GPU_BENCH (pytest -k expression choosing the benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.." || exit

DRY_RUN=${LOWBIT_GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '3,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1

PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
rm -f "$OUT"/gpu_tests.xml "$OUT"/sanitize_*.log "$OUT"/bench_dry_run.json
: >"$LOG"
BUDGET=${LOWBIT_GPU_CHECK_BUDGET:-540}
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
JOBS=${MAX_JOBS:-$(nproc)}
T0=$SECONDS
# Triton compiles for the GPU (tests/conftest.py turns its interpreter on unless this says otherwise).
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

# pytest with SIGINT restored: a shell that starts this script in the background may have it ignored,
# and `timeout -s INT` must reach pytest so that it still writes its junit XML and results JSON.
run_pytest() {
  "$PY" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, ""); import pytest; sys.exit(pytest.main(sys.argv[1:]))' "$@"
}

# Per-step limits in seconds (H200, 16 cores: build ~1.5 min, tests ~1.5, each sanitizer < 1, benches ~1.5).
LIMIT_BUILD=150 LIMIT_TESTS=150 LIMIT_BENCH=120
SANITIZERS="memcheck:60 racecheck:60 synccheck:45"

NAMES=() RESULTS=() TIMES=() LIMITS=() NOTES=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT COMMAND...: COMMAND under `timeout` (limit capped by what is left of the
# budget, less RESERVE seconds kept for the steps after it), its output into the log; records ok /
# failed (exit status) / timeout, or skipped when the budget is spent.
RESERVE=75 # at least a minute for the benchmarks, 15 s to copy their results
run_step() {
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((BUDGET - RESERVE - (SECONDS - T0)))
  ((limit <= left)) || limit=$left
  if ((limit < 5)); then
    log "=== $name: skipped, the budget of ${BUDGET}s is spent"
    record "$name" skipped 0 0 "budget spent"
    return
  fi
  log "=== $name (limit ${limit}s): $*"
  start=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) record "$name" ok $((SECONDS - start)) "$limit" "" ;;
    124 | 137) record "$name" timeout $((SECONDS - start)) "$limit" "" ;;
    *) record "$name" failed $((SECONDS - start)) "$limit" "exit $rc" ;;
  esac
  log "=== $name: ${RESULTS[-1]} after ${TIMES[-1]}s"
}

record() {
  NAMES+=("$1") RESULTS+=("$2") TIMES+=("$3") LIMITS+=("$4") NOTES+=("$5")
  [ "$2" = ok ] || FAILED=1
}

# ---- the steps ---------------------------------------------------------------------------------

step_env() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "cores: $(nproc), dry run: $DRY_RUN"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  [ -x "$SANITIZER" ] && "$SANITIZER" --version | head -n 2
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA",
torch.version.cuda, "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import triton; print("triton", triton.__version__)'
}

step_build() {
  if ((DRY_RUN)); then
    echo "dry run: would run TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=$JOBS $PY -m pip install --no-build-isolation" \
      "--no-deps --no-index -e ."
    "$PY" -c 'import lowbit; from lowbit import _native; print("lowbit", lowbit.__version__, _native.status())'
    return
  fi
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=$JOBS "$PY" -m pip install --disable-pip-version-check --no-build-isolation \
    --no-deps --no-index -e . || return
  "$PY" -c 'from lowbit import _native; s = _native.status(); print(s)
assert s.loaded and s.cuda, "lowbit._C did not load with its CUDA kernels"'
}

step_tests() {
  local extra=()
  "$PY" -c 'import xdist' 2>/dev/null && extra+=(-n "$(((JOBS + 1) / 2 < 8 ? (JOBS + 1) / 2 : 8))")
  "$PY" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 120)
  # shellcheck disable=SC2086 # LOWBIT_GPU_TESTS is a list of pytest arguments
  run_pytest tests ${LOWBIT_GPU_TESTS:--m gpu} -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
    "${extra[@]}"
}

# step_sanitize TOOL: the driver under compute-sanitizer, its own log in $OUT, the summary lines here.
step_sanitize() {
  local tool=$1 tool_log=$OUT/sanitize_$1.log rc
  if ((DRY_RUN)); then
    "$PY" scripts/gpu_sanitize.py --dry-run
    return
  fi
  # No caching allocator: memcheck then sees a read past a tensor's end as outside any allocation.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    --show-backtrace device "$PY" scripts/gpu_sanitize.py >"$tool_log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize:|FAILED|^=========  *(Invalid|Race|Barrier|Error|Program hit)" \
    "$tool_log" | head -n 25
  return "$rc"
}

BENCH_K=${LOWBIT_GPU_BENCH:-gpu_decode or gpu_fused_gemv or int8_linear_vs_bf16 or codebook_linear_vs_dense or (bitpack and bits4) or decode_attention_vs_sdpa}

step_bench() {
  local args=(-q -p no:cacheprovider --benchmark-disable-gc "--benchmark-columns=median,iqr,rounds" -k "$BENCH_K")
  if ((DRY_RUN)); then
    args+=(--lowbit-device cpu --lowbit-quick --lowbit-results "$OUT/bench_dry_run.json")
  else
    args+=(--lowbit-device cuda)
  fi
  (cd bench && run_pytest . "${args[@]}")
}

# The results JSON the benchmarks wrote (named in their log), copied to $OUT and shown as a table.
show_results() {
  local path
  path=$(grep -a '^lowbit results: ' "$LOG" | tail -n 1 | cut -d' ' -f3-)
  if [ -z "$path" ] || [ ! -f "$path" ]; then
    echo "no results JSON was written"
    return 1
  fi
  [ "$(dirname "$path")" = "$OUT" ] || cp "$path" "$OUT/"
  "$PY" -c 'import json, sys; from lowbit.cli import format_results
print(format_results(json.load(open(sys.argv[1]))))' "$path"
  echo "results: $path"
}

export -f run_pytest step_env step_build step_tests step_sanitize step_bench show_results
export DRY_RUN PY OUT LOG JOBS BENCH_K SANITIZER

run_step env 30 bash -c step_env
run_step build "$LIMIT_BUILD" bash -c step_build
run_step gpu-tests "$LIMIT_TESTS" bash -c step_tests
if ((DRY_RUN)); then
  run_step sanitize-driver 60 bash -c 'step_sanitize none'
else
  for tool_limit in $SANITIZERS; do
    tool=${tool_limit%:*}
    run_step "$tool" "${tool_limit#*:}" bash -c "step_sanitize $tool"
    if [ -f "$OUT/sanitize_$tool.log" ]; then
      NOTES[-1]=$(grep -h -m 1 "ERROR SUMMARY" "$OUT/sanitize_$tool.log" | sed 's/^=* *//')
    fi
  done
fi
RESERVE=15
run_step bench "$LIMIT_BENCH" bash -c step_bench
RESERVE=0
run_step results 15 bash -c show_results

{
  echo
  printf '%-16s %-8s %8s %8s  %s\n' step result seconds limit note
  for i in "${!NAMES[@]}"; do
    printf '%-16s %-8s %8s %8s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${LIMITS[$i]}" "${NOTES[$i]}"
  done
  printf '%-16s %-8s %8s %8s\n' total "$( ((FAILED)) && echo FAILED || echo ok)" $((SECONDS - T0)) "$BUDGET"
  echo "logs and results: $OUT"
} | tee "$OUT/summary.txt" | tee -a "$LOG"
exit "$FAILED"
