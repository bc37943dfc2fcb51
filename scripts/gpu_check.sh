#!/usr/bin/env bash
# On a GPU machine with a CUDA build of torch preinstalled and no network:
# builds convbn from source (CUDA kernels included), runs the whole test
# suite (CUDA tests included), compute-sanitizer (memcheck, racecheck) over
# a short CUDA test run, and the GPU benchmark. Logs and tables go to one
# folder: $1, else $OUT (the device tool's), else gpu_results/.
#
#   bash scripts/gpu_check.sh [DIR] [STAGES]   STAGES: any of build,test,sanitize,bench
#                                               (default: all, in that order)
# Each stage appends to DIR/summary.txt; stages can run in separate calls
# (the build is kept in the tree).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
STAGES=${2:-build,test,sanitize,bench}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
summary() { echo "$*" | tee -a "$RESULTS/summary.txt"; }

has() { [[ ",$STAGES," == *",$1,"* ]]; }

if has build; then
  { nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; } \
    > "$RESULTS/device.txt" 2>&1
  start=$SECONDS
  if FORCE_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1; then
    summary "build: ok ($((SECONDS - start)) s)"
  else
    summary "build: FAILED (see build.log)"; tail -40 "$RESULTS/build.log"; exit 1
  fi
  # The C++ library and deployment programs (CPU operators; GoogleTest may be
  # missing there), for the tests that run them. Optional: they skip without.
  start=$SECONDS
  if cmake -S . -B build -DCONVBN_BUILD_TESTS=OFF \
       -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
       > "$RESULTS/cmake.log" 2>&1 && cmake --build build -j "$MAX_JOBS" >> "$RESULTS/cmake.log" 2>&1; then
    summary "cmake build (libconvbn.so, examples/cpp): ok ($((SECONDS - start)) s)"
  else
    summary "cmake build: FAILED (see cmake.log); the C++ program tests will skip"
  fi
fi

if has test; then
  [ -x build/examples/cpp/convbn_jit_infer ] && export CONVBN_BUILD_DIR="$PWD/build"
  python3 -m pytest -q -rs tests > "$RESULTS/pytest.log" 2>&1
  summary "pytest (all, CUDA included): exit $? — $(tail -1 "$RESULTS/pytest.log")"
fi

if has sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 1 \
        python3 -m pytest -q -x tests/test_cuda.py -k "half_types or non_contiguous" \
        > "$RESULTS/sanitizer_$tool.log" 2>&1
      summary "compute-sanitizer $tool: exit $? — $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RESULTS/sanitizer_$tool.log" | tail -1)"
    done
  else
    summary "compute-sanitizer: not found"
  fi
fi

if has bench; then
  python3 benchmarks/bench_gpu.py --markdown "$RESULTS/gpu_results.md" ${BENCH_ARGS:-} > "$RESULTS/bench.log" 2>&1
  summary "benchmark: exit $? (gpu_results.md)"
fi
