#!/usr/bin/env bash
# Everything a lent GPU machine has to run for the CUDA backend, in stages that each fit one call of at most
# ten minutes. Run from the repository root on the GPU machine; results and logs go to $OUT (or the second
# argument), and the last lines printed are a short summary.
#
#   bash bench/gpu_check.sh test      build and install, conveyor info, the CUDA tests, the whole suite, ctest
#   bash bench/gpu_check.sh sanitize  compute-sanitizer memcheck, racecheck and synccheck on the CUDA tests
#                                     (the 4096-step windows left out: under the sanitizer they take minutes)
#   bash bench/gpu_check.sh bench     bench/cuda_rnn.py for the LSTM and the GRU, float32 and bfloat16
#   bash bench/gpu_check.sh speed     bench/speed.py: the full grid of issue 7 against cuDNN and FlashRNN
#
# The machine has no network: the build uses the installed pybind11, scikit-build-core and CMake.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_check.sh test|sanitize|bench|speed [OUT_DIR]}
out=${2:-${OUT:-/tmp/conveyor-gpu}}
mkdir -p "$out"
summary=()
note() { summary+=("$1"); }

install() {
  if ! python3 -c "import conveyor, sys; sys.exit(0 if conveyor.cuda_built() else 1)" 2>/dev/null; then
    python3 -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1 \
      || { tail -40 "$out/build.log"; echo "build failed"; exit 1; }
  fi
  python3 -m conveyor info | tee "$out/info.txt"
}

case "$stage" in
  test)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
    install
    python3 -m pytest -q -m cuda tests > "$out/pytest-cuda.txt" 2>&1
    note "pytest -m cuda: rc $? -- $(tail -1 "$out/pytest-cuda.txt")"
    python3 -m pytest -q tests > "$out/pytest-all.txt" 2>&1
    note "pytest (all): rc $? -- $(tail -1 "$out/pytest-all.txt")"
    { cmake -S . -B build-gpu -DCONVEYOR_BUILD_TESTS=ON && cmake --build build-gpu -j "$(nproc)" \
        && ctest --test-dir build-gpu --output-on-failure; } > "$out/ctest.txt" 2>&1
    note "ctest: rc $? -- $(grep -E 'tests passed|tests failed' "$out/ctest.txt" | tail -1)"
    grep -E "FAILED|Error" "$out/pytest-cuda.txt" | head -20
    ;;
  sanitize)
    install
    for tool in memcheck racecheck synccheck; do
      timeout 170 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        python3 -m pytest -q -x -m cuda tests/test_cuda.py -k "not 4096 and (T4-B3 or T5-B17 or T3-B33 or optional)" \
        > "$out/sanitizer-$tool.txt" 2>&1
      note "compute-sanitizer $tool: rc $? -- $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' \
        "$out/sanitizer-$tool.txt" | tail -2 | tr '\n' ' ')"
    done
    ;;
  bench)
    install
    for cell in lstm gru; do
      for dtype in float32 bfloat16; do
        python3 bench/cuda_rnn.py --cell "$cell" --dtype "$dtype" --out "$out/cuda-$cell-$dtype.md" \
          > "$out/bench-$cell-$dtype.log" 2>&1
        note "bench $cell $dtype: rc $?"
        tail -9 "$out/cuda-$cell-$dtype.md" 2>/dev/null
      done
    done
    ;;
  speed)
    install
    python3 bench/speed.py --out "$out/speed.md" --plot "$out/speed.png" > "$out/speed.log" 2>&1
    note "bench/speed.py: rc $?"
    tail -20 "$out/speed.md" 2>/dev/null
    ;;
  *)
    echo "unknown stage '$stage': expected test, sanitize, bench or speed"
    exit 2
    ;;
esac

echo "== summary ($stage)"
printf '%s\n' "${summary[@]}"
