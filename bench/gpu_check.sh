#!/usr/bin/env bash
# Everything a lent GPU machine has to check for the CUDA backend, as one prepared command. Run from the
# repository root on the GPU machine (16 cores, an H100 or H200, no network: the build uses the installed
# pybind11, scikit-build-core and CMake). Results go to OUT_DIR (the second argument, else $OUT): at most
# six files, summary.txt, bench.md, regularisers.md, ncu.txt, ncu.ncu-rep and logs.tar.gz (every log; the
# speed stage adds speed.md and speed.png). The last lines printed are the summary; the exit code is 0 only when every stage
# that should have run ran and passed.
#
#   bash bench/gpu_check.sh all OUT_DIR   about 7-8 minutes on an H100, at most CONVEYOR_GPU_CHECK_SECONDS
#                                         (default 510): the stages below, after one build. Through the
#                                         device tool: command "bash bench/gpu_check.sh all $OUT",
#                                         timeout_s 600 (the script stops itself first)
#   bash bench/gpu_check.sh test|sanitize|bench|ncu|speed OUT_DIR   one stage, building first if needed
#
# Stages, each under its own timeout (clipped to the time left), so one stuck stage cannot eat the rest:
#   preflight  a GPU (nvidia-smi) and nvcc, before anything is built: without them, fail at once
#   build      pip install --no-build-isolation --no-deps . with every core, into build-gpu/ with the C++
#              tests and -lineinfo (one build dir: ctest and the sanitizers reuse its test binaries)
#   a gpu      nvidia-smi and conveyor info; fails loudly when the CUDA backend is not built, is the
#              emulated one, or sees no GPU
#   b test     python -m pytest -m cuda (once) and ctest -R 'test_cuda|test_emulator|test_ptx'
#   c sanitize compute-sanitizer memcheck, racecheck and synccheck on a few fast tests of test_cuda.py (both
#              algorithms), test_floor.py, and the test_ptx and test_emulator binaries (b and c run at once:
#              they check correctness, not speed)
#   d bench    bench/cuda_rnn.py: LSTM and GRU against cuDNN, H 768, 256, 1024, B 16, 64, 1, 256, T=256,
#              float32 and bfloat16, per_step and persistent, with the persistent floor; rows flushed to
#              bench.md as they are measured, so a timeout keeps them; after e, the LSTM's persistent
#              rows at 4 units per block and in TF32 (bench/NOTES.md, version 3) and bench/gemm.py's
#              time-parallel products against cuBLAS, appended
#   e ncu      Nsight Compute (--set full) on one forward_persistent_kernel and one backward_persistent_kernel
#              (LSTM, H=768, B=16, T=64, float32), then one forward_step_kernel of the per-step path at the
#              same size: the report and the details pages as text
#   f regularisers  bench/regularisers.py cost --device cuda: layer norm, zoneout and DropConnect against the
#              plain cell, forward + backward (with what time is left, last)
#   speed      bench/speed.py, the full grid of issue 7 (not part of all: it takes far longer)
#
# CONVEYOR_GPU_CHECK_EMULATED=1 rehearses the script on a CPU machine: no GPU or nvidia-smi is needed, the
# build is the emulated backend (docs/emulated-cuda.md), a-gpu accepts it, and the GPU-only tools that are
# absent say so. Its results say nothing about a GPU.
set -uo pipefail

stage=${1:-}
out=${2:-${OUT:-}}
case "$stage" in
  all | test | sanitize | bench | ncu | speed) ;;
  *)
    echo "usage: bash bench/gpu_check.sh all|test|sanitize|bench|ncu|speed OUT_DIR" >&2
    exit 2
    ;;
esac
if [[ -z "$out" ]]; then
  echo "usage: bash bench/gpu_check.sh $stage OUT_DIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
build_dir=build-gpu
emulated=${CONVEYOR_GPU_CHECK_EMULATED:-0}
logs=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-gpu-check.XXXXXX")
results="$logs/results"
mkdir -p "$results"
deadline=$((SECONDS + ${CONVEYOR_GPU_CHECK_SECONDS:-510}))
stage_deadline=$deadline  # a stage's own end, when it must leave time for the stages after it
reserve=15   # seconds kept for packing the logs and printing the summary
names=()
started=$SECONDS

# Each check leaves one line in $results/NAME: "PASS|FAIL|SKIP NAME (seconds): detail". Background checks
# write theirs too, so names lists every check in the order it was started.
verdict() { printf '%s %s: %s\n' "$2" "$1" "$3" > "$results/$1"; }
skip() {
  names+=("$1")
  verdict "$1" SKIP "$2"
}

# check NAME LIMIT_S PATTERN COMMAND...: runs COMMAND under `timeout` (LIMIT_S clipped to the time left) with
# its output in $logs/NAME.log; the detail is the log's last line matching PATTERN (or its last line).
check() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  local left=$((deadline - SECONDS - reserve)) stage_left=$((stage_deadline - SECONDS))
  ((limit > left)) && limit=$left
  ((limit > stage_left)) && limit=$stage_left
  if ((limit < 10)); then
    verdict "$name" SKIP "no time left (CONVEYOR_GPU_CHECK_SECONDS)"
    return 1
  fi
  local t0=$SECONDS rc detail
  timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  detail=$(grep -E -- "$pattern" "$logs/$name.log" 2>/dev/null | tail -1)
  [[ -n "$detail" ]] || detail=$(tail -1 "$logs/$name.log" 2>/dev/null)
  detail=$(printf '%s' "$detail" | tr -s ' \t' ' ' | cut -c1-160)
  if ((rc == 0)); then
    verdict "$name" PASS "($((SECONDS - t0)) s) $detail"
  elif ((rc == 124 || rc == 137)); then
    verdict "$name" FAIL "($((SECONDS - t0)) s) timed out after $limit s; last: $detail"
  else
    verdict "$name" FAIL "($((SECONDS - t0)) s) exit $rc: $detail"
  fi
  return "$rc"
}
run() {
  names+=("$1")
  check "$@"
}

# skip_rest WHY NAME...: what a failed preflight, build or GPU check leaves undone, listed as skipped.
skip_rest() {
  local why=$1 rest=()
  shift
  case "$stage" in
    all) rest=(b-test c-sanitize d-bench e-ncu f-regularisers) ;;
    test) rest=(b-test) ;;
    sanitize) rest=(c-sanitize) ;;
    bench) rest=(d-bench f-regularisers) ;;
    ncu) rest=(e-ncu) ;;
    speed) rest=(speed) ;;
  esac
  for name in "$@" "${rest[@]}"; do skip "$name" "not run: $why"; done
}

finish() {
  trap - EXIT
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2> /dev/null
  local line status=0
  {
    if [[ -f "$out/bench.md" ]]; then
      echo "== headline rows of bench.md (LSTM, H=768, B=16 and 64; the whole grid is in the file)"
      grep -E '^\| lstm \| [a-z0-9]+ \| [a-z_]+ \| (16|64) \| 768 \|' "$out/bench.md" | cut -c1-250
    fi
    echo "== gpu_check.sh $stage: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $((SECONDS - started)) s" \
      "(logs: $out/logs.tar.gz)"
    for name in "${names[@]}"; do
      if [[ -f "$results/$name" ]]; then
        line=$(cat "$results/$name")
      else
        line="FAIL $name: no result (killed before it finished)"
      fi
      [[ "$line" == PASS* ]] || status=1
      echo "$line"
    done
    if ((status == 0)); then echo "== all passed"; else echo "== FAILED: see the lines above that are not PASS"; fi
  } > "$out/summary.txt"
  cat "$out/summary.txt"
  rm -rf "$logs"
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

# -- preflight and build ---------------------------------------------------------------------------------------

# A GPU and nvcc, before minutes go into a build that could not run.
preflight() {
  names+=(preflight)
  local why=""
  if [[ "$emulated" == 1 ]]; then
    verdict preflight PASS "CONVEYOR_GPU_CHECK_EMULATED=1: a rehearsal on the emulated build, not a GPU check"
    return 0
  fi
  if ! command -v nvidia-smi > /dev/null; then
    why="no GPU: nvidia-smi is not installed on this machine"
  elif ! nvidia-smi -L > "$logs/preflight.log" 2>&1 || ! grep -q '^GPU' "$logs/preflight.log"; then
    why="no GPU: nvidia-smi lists none ($(head -1 "$logs/preflight.log"))"
  elif ! command -v nvcc > /dev/null; then
    why="no nvcc: the CUDA backend cannot be built here"
  fi
  if [[ -n "$why" ]]; then
    verdict preflight FAIL "$why"
    preflight_why=$why
    echo "gpu_check.sh: $why; nothing else can run" >&2
    return 1
  fi
  verdict preflight PASS "$(head -1 "$logs/preflight.log" | cut -c1-120); $(nvcc --version | tail -1)"
}

build() {
  # CMAKE_ARGS may hold the emulated build's flags from a CPU session; this build is the GPU's.
  run build 240 'Successfully installed|error|Error' env -u CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$python" -m pip install --no-build-isolation --no-deps -v . -C build-dir="$build_dir" \
    -C cmake.define.CONVEYOR_BUILD_TESTS=ON -C cmake.define.CONVEYOR_CUDA_LINEINFO=ON \
    -C cmake.define.CONVEYOR_EMULATE_CUDA="$([[ "$emulated" == 1 ]] && echo ON || echo OFF)"
}

# -- a: the GPU and the build --------------------------------------------------------------------------------

gpu_and_build_ok() {
  if [[ "$emulated" != 1 ]]; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv
  fi
  "$python" -m conveyor info || return 1
  "$python" - "$emulated" << 'EOF'
import sys

import conveyor
from conveyor import _conveyor

if not conveyor.cuda_built():
    sys.exit("FAILED: this build has no CUDA backend (was nvcc found? see build.log)")
if _conveyor.cuda_emulated() and sys.argv[1] != "1":
    sys.exit("FAILED: the CUDA backend is the CPU emulator (CMAKE_ARGS=-DCONVEYOR_EMULATE_CUDA=ON?)")
if conveyor.cuda_device_count() == 0:
    sys.exit("FAILED: the CUDA backend sees no GPU")
if not conveyor.cuda_available():
    sys.exit("FAILED: the CUDA backend cannot run on this GPU (no code for its architecture?)")
kind = "the CPU emulator (a rehearsal)" if _conveyor.cuda_emulated() else "the GPU"
print(f"OK: CUDA backend built for {kind}, {conveyor.cuda_device_count()} device(s), cell check passed")
EOF
}

# -- b, c: correctness -----------------------------------------------------------------------------------------

# A few fast tests of both algorithms for the sanitizers: every cell at one odd shape in float32, the bfloat16
# tests, the persistent kernels' layer normalisation (its blocks meet over each row's statistics), and the floor.
sanitizer_filter="(device and T5-B17-I40-H70 and float32 and test_matches_reference) or test_floor"
sanitizer_filter+=" or (bfloat16 and test_half_precision_within and not regularisers)"
sanitizer_filter+=" or (test_persistent_layer_norm_at_every_units_per_block and 8)"
sanitizer_tests=(tests/test_cuda.py tests/test_cuda_regularisers.py tests/test_floor.py -k "$sanitizer_filter")

sanitize_with() {
  local tool=$1 extra=()
  [[ "$tool" == memcheck ]] && extra=(--leak-check no)
  local sanitizer=(compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "${extra[@]}")
  check "c-$tool-pytest" 200 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "${sanitizer[@]}" "$python" -m pytest -q -x -p no:cacheprovider "${sanitizer_tests[@]}"
  check "c-$tool-test_ptx" 60 'ERROR SUMMARY|RACECHECK SUMMARY|passed' "${sanitizer[@]}" "$build_dir/tests/cpp/test_ptx"
  # test_emulator checks the runtime's error codes on purpose: those API errors are not findings.
  check "c-$tool-test_emulator" 90 'ERROR SUMMARY|RACECHECK SUMMARY|passed' "${sanitizer[@]}" --report-api-errors no \
    "$build_dir/tests/cpp/test_emulator"
}

correctness() {
  local pids=() workers=()
  stage_deadline=$((SECONDS + 210))  # b and c together, so that d and e keep their minutes
  if "$python" -c "import xdist" 2> /dev/null; then workers=(-n 4); fi
  names+=(b-pytest-cuda b-ctest)
  check b-pytest-cuda 240 'passed|failed|error' "$python" -m pytest -q -m cuda -p no:cacheprovider "${workers[@]}" tests &
  pids+=($!)
  check b-ctest 200 'tests passed|tests failed' ctest --test-dir "$build_dir" -R 'test_cuda|test_emulator|test_ptx' \
    --output-on-failure &
  pids+=($!)
  if [[ "$stage" == all || "$stage" == sanitize ]]; then
    if command -v compute-sanitizer > /dev/null; then
      for tool in memcheck racecheck synccheck; do
        names+=("c-$tool-pytest" "c-$tool-test_ptx" "c-$tool-test_emulator")
        sanitize_with "$tool" &
        pids+=($!)
      done
    else
      skip c-sanitizers "compute-sanitizer is not installed"
    fi
  fi
  wait "${pids[@]}"
  stage_deadline=$deadline
}

sanitize_only() {
  local pids=()
  if ! command -v compute-sanitizer > /dev/null; then
    skip c-sanitizers "compute-sanitizer is not installed"
    return
  fi
  for tool in memcheck racecheck synccheck; do
    names+=("c-$tool-pytest" "c-$tool-test_ptx" "c-$tool-test_emulator")
    sanitize_with "$tool" &
    pids+=($!)
  done
  wait "${pids[@]}"
}

# -- d, e: speed and the profile -------------------------------------------------------------------------------

bench() {
  run d-bench 170 'failed|^\| ' env PYTHONUNBUFFERED=1 "$python" bench/cuda_rnn.py \
    --cell lstm,gru --dtype float32,bfloat16 --hidden 768,256,1024 --batch 16,64,1,256 --steps 256 \
    --algorithm per_step,persistent --repeats 10 --warmup 2 --budget-ms 500 --out "$out/bench.md"
  local rows
  rows=$(grep -c '^| \(lstm\|gru\) ' "$out/bench.md" 2> /dev/null)
  names+=(d-bench-rows)
  if [[ "${rows:-0}" -ge 96 ]]; then
    verdict d-bench-rows PASS "$rows of 96 rows in bench.md"
  else
    verdict d-bench-rows FAIL "${rows:-0} of 96 rows in bench.md"
  fi
}

# What bench/NOTES.md's version 3 predicts and only a GPU decides: the plan's units per block against the old
# choice of 4, TF32 in the float32 forward, and the time-parallel products against cuBLAS and the measured
# dense peak (the speed issue's 60% target). After the profile, so that a short run keeps that; appended to
# bench.md under their own headings.
bench_version3() {
  local persistent=(env PYTHONUNBUFFERED=1 "$python" bench/cuda_rnn.py --cell lstm --steps 256
    --algorithm persistent --repeats 10 --warmup 2 --budget-ms 300)
  run d-bench-units 30 'failed|^\| ' env CONVEYOR_PERSISTENT_UNITS=4 "${persistent[@]}" --dtype float32,bfloat16 \
    --hidden 768 --batch 16,64 --out "$logs/units-4.md"
  run d-bench-tf32 30 'failed|^\| ' "${persistent[@]}" --tf32 --dtype float32 --hidden 768,1024 --batch 16,64 \
    --out "$logs/tf32.md"
  # The time-parallel products against cuBLAS and the measured dense peak (the speed issue's 60% target).
  run d-bench-gemm 40 'failed|^\| ' env PYTHONUNBUFFERED=1 "$python" bench/gemm.py --dtype float32,bfloat16 \
    --tf32 --out "$logs/gemm.md"
  {
    printf '\n## The same rows with CONVEYOR_PERSISTENT_UNITS=4 (the plan before version 3)\n\n'
    cat "$logs/units-4.md" 2> /dev/null
    printf '\n## float32 with --tf32 (the persistent forward on TF32 tensor cores; cuDNN in TF32)\n\n'
    cat "$logs/tf32.md" 2> /dev/null
    printf '\n'
    cat "$logs/gemm.md" 2> /dev/null
  } >> "$out/bench.md"
}

ncu_profile() {
  if ! command -v ncu > /dev/null; then
    skip e-ncu "ncu (Nsight Compute) is not installed"
    return
  fi
  local target=("$python" bench/profile_window.py --device cuda --cell lstm --steps 64 --batch 16 --hidden 768
    --dtype float32 --algorithm persistent --repeats 1)
  local kernels=(-k 'regex:(forward|backward)_persistent_kernel' -c 2 -f -o "$logs/ncu")
  if ! run e-ncu 110 'PROF|Error|error|ms per window' ncu --set full --import-source yes "${kernels[@]}" \
    "${target[@]}"; then
    # Should kernel replay refuse the cooperative launches, fewer sections replaying the whole program.
    run e-ncu-application-replay 90 'PROF|Error|error|ms per window' ncu --replay-mode application \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis "${kernels[@]}" "${target[@]}"
  fi
  if [[ -f "$logs/ncu.ncu-rep" ]]; then
    ncu --import "$logs/ncu.ncu-rep" --page details > "$out/ncu.txt" 2>&1
    ncu --import "$logs/ncu.ncu-rep" --page details --csv > "$logs/ncu-details.csv" 2>&1
    # Kept beside the text where it fits what a lent machine sends back (16 MiB a file).
    if (($(stat -c %s "$logs/ncu.ncu-rep") < 15000000)); then cp "$logs/ncu.ncu-rep" "$out/ncu.ncu-rep"; fi
    names+=(e-ncu-kernels)
    local profiled
    profiled=$(grep -c 'Section: GPU Speed Of Light Throughput' "$out/ncu.txt")
    if ((profiled >= 2)); then
      verdict e-ncu-kernels PASS "$profiled kernels profiled (ncu.txt)"
    else
      verdict e-ncu-kernels FAIL "$profiled of 2 kernels in ncu.txt"
    fi
  fi
  # The per-step forward too, at the same size: it ran 10-20x its prediction on the H200, and the notes ask
  # for its profile before it changes. Appended to ncu.txt; its report stays in the logs.
  local per_step=("${target[@]}")
  per_step[-3]=per_step
  if run e-ncu-per-step 45 'PROF|Error|error|ms per window' ncu --set full --import-source yes \
    -k regex:forward_step_kernel -s 8 -c 1 -f -o "$logs/ncu-per-step" "${per_step[@]}" \
    && [[ -f "$logs/ncu-per-step.ncu-rep" ]]; then
    ncu --import "$logs/ncu-per-step.ncu-rep" --page details >> "$out/ncu.txt" 2>&1
  fi
}

regularisers_cost() {
  run f-regularisers 45 'needs|Error|error|^\| (lstm|gru) ' env PYTHONUNBUFFERED=1 "$python" bench/regularisers.py \
    cost --device cuda --repeats 5 --out "$out/regularisers.md"
}

speed() {
  run speed 540 'Note|FlashRNN' env PYTHONUNBUFFERED=1 "$python" bench/speed.py --algorithm per_step,persistent \
    --out "$out/speed.md" --plot "$out/speed.png"
}

# -- the stages ------------------------------------------------------------------------------------------------

export python emulated
preflight_why=""
preflight || { skip_rest "$preflight_why" build a-gpu; exit 1; }
build || { skip_rest "the build failed" a-gpu; exit 1; }
run a-gpu 90 'OK:|FAILED' bash -c "$(declare -f gpu_and_build_ok); gpu_and_build_ok" || { skip_rest "a-gpu failed"; exit 1; }
case "$stage" in
  all)
    correctness
    bench
    ncu_profile
    bench_version3
    regularisers_cost
    ;;
  test) correctness ;;
  sanitize) sanitize_only ;;
  bench)
    bench
    bench_version3
    regularisers_cost
    ;;
  ncu) ncu_profile ;;
  speed) speed ;;
esac
