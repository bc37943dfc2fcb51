#!/usr/bin/env bash
# The GPU check, for a machine with a GPU, a CUDA build of torch, nvcc and no
# network, where one command may run 10 minutes: builds convbn's CUDA
# kernels (or takes a prebuilt library), runs the CUDA tests,
# compute-sanitizer and the GPU benchmark, each stage under its own time
# limit. Logs and tables go to one flat folder, with a one-screen summary.txt.
#
#   bash scripts/gpu_check.sh [DIR] [STAGES]
#
# DIR: $1, else $OUT (the device tool's), else gpu_results/. STAGES: a
# comma-separated list, run in this order (default build,test,sanitize,bench):
#   build     python/convbn/_C*.so with CUDA kernels: prebuilt/'s (made by
#             scripts/cuda_build_check.sh and carried here) when it fits this
#             machine's torch, GPU and sources, else built here (setup.py
#             build_ext --inplace, ninja, MAX_JOBS=nproc); then checks that
#             every operator with a CPU kernel has a CUDA one
#   test      tests/test_cuda.py, then the suite's other CUDA cases (-k cuda)
#   sanitize  compute-sanitizer memcheck and racecheck on a short CUDA test
#             run: convbn's kernels only, caching allocator off
#   bench     benchmarks/bench_gpu.py, the layers (BENCH_ARGS: more arguments)
#   networks  benchmarks/bench_gpu_networks.py: whole ResNet-50 training,
#             frozen-BN fine-tuning, the BN passes' bandwidth (NETWORKS_ARGS)
#   cpu       the C++ library and programs (CMake), then the suite's CPU cases
# The stages use the tree's package (PYTHONPATH=python, no pip install), so a
# later call on a fresh machine can run `test` or `sanitize` alone: with the
# library of an earlier build carried in python/convbn/, or prebuilt/. A
# stage that needs the library and finds none builds it first.
#
# Time: every stage runs under its own limit (timeout), and all of them within
# GPU_CHECK_BUDGET seconds (default 570): a stage that no longer fits is
# skipped, so summary.txt is complete before the 10 minutes are up. Limits
# (seconds, from the environment): BUILD_TIMEOUT 420, TEST_CUDA_TIMEOUT 180,
# TEST_REST_TIMEOUT 300, SANITIZE_TIMEOUT 240 (per tool), BENCH_TIMEOUT 300,
# NETWORKS_TIMEOUT 540, CMAKE_TIMEOUT 300, CPU_TEST_TIMEOUT 540. Sanitizer run: SANITIZE_FILES
# (default tests/test_cuda.py), SANITIZE_K (the -k expression, default
# "half_types or non_contiguous"), SANITIZE_KERNELS (the --kernel-name
# filter, default kns=convbn), SANITIZER_ARGS (more options).
# GPU_CHECK_REBUILD=1 builds even when prebuilt/ fits.
#
# Files in DIR (at most 8): summary.txt, device.txt, build.log, test.log,
# sanitizer.log, bench.log, gpu_results.md, cpu.log; with
# GPU_CHECK_KEEP_LIBRARY=1, also prebuilt/ (the library and BUILD_INFO).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
STAGES=${2:-build,test,sanitize,bench}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))
SUMMARY=$RESULTS/summary.txt
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

for stage in ${STAGES//,/ }; do
  case $stage in
    build | test | sanitize | bench | networks | cpu) ;;
    *) echo "gpu_check: unknown stage '$stage' (stages: build,test,sanitize,bench,networks,cpu)" >&2; exit 2 ;;
  esac
done
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "$*" | tee -a "$SUMMARY"; }
# One summary line: what, status, seconds, details.
FAILURES=0
report() {
  local details=${4:-}
  [ "$2" = "skipped (no time left)" ] && details=""
  printf '%-22s %-22s %5s s  %s\n' "$1" "$2" "$3" "$details" | tee -a "$SUMMARY"
  case $2 in FAILED* | TIMED*) FAILURES=$((FAILURES + 1)) ;; esac
}

# run_step LIMIT LOG CMD...: runs CMD under `timeout`, its output appended
# to LOG, within what is left of the budget. Sets STEP_STATUS (ok, FAILED
# (exit N), TIMED OUT (N s), skipped (no time left)), STEP_SECS, and
# STEP_FROM (LOG's first line of this step).
run_step() {
  local limit=$1 log=$2 left rc=0 t0=$SECONDS
  shift 2
  left=$((DEADLINE - SECONDS - 20))
  STEP_SECS=0
  touch "$log"
  STEP_FROM=$(($(wc -l < "$log") + 1))
  if ((left < 30)); then
    STEP_STATUS="skipped (no time left)"
    return 0
  fi
  ((limit <= left)) || limit=$left
  { printf '== %s (limit %s s)' "$(date -u +%H:%M:%S)" "$limit"; printf ' %q' "$@"; echo; } >> "$log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1 || rc=$?
  STEP_SECS=$((SECONDS - t0))
  case $rc in
    0) STEP_STATUS=ok ;;
    124 | 137) STEP_STATUS="TIMED OUT ($limit s)" ;;
    *) STEP_STATUS="FAILED (exit $rc)" ;;
  esac
}

# pytest's closing counts ("120 passed, 9 skipped in 80.1s") in LOG from
# line FROM on.
pytest_counts() {
  tail -n +"$2" "$1" | grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)|no tests ran' |
    tail -1 | sed 's/=//g; s/^ *//; s/ *$//' || true
}

touch "$SUMMARY"
SUMMARY_FROM=$(($(wc -l < "$SUMMARY") + 1))
say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), stages $STAGES, budget ${GPU_CHECK_BUDGET:-570} s"

# ---- Prerequisites, device information -------------------------------------
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh 2>/dev/null
say "toolkit: ${CUDA_HOME:+CUDA_HOME=$CUDA_HOME, found by: }$CONVBN_CUDA_FOUND_BY"
# shellcheck source=scripts/prebuilt.sh
source scripts/prebuilt.sh

torch_state=$("$PY" -c '
import torch
if torch.version.cuda is None:
    print("cpu-build")
elif not torch.cuda.is_available():
    print("no-gpu")
else:
    print("ok")' 2>/dev/null || echo missing)

missing=()
need() { missing+=("$1 -> $2"); }
case $torch_state in
  missing) need "torch" "nothing can run" ;;
  cpu-build) need "a CUDA build of torch" "nothing can run (torch is a CPU build)" ;;
  no-gpu) need "a visible GPU" "test, sanitize, bench and networks skipped (torch.cuda.is_available() is False)" ;;
esac
HAVE_BUILD=1
if [ -z "${CUDA_HOME:-}" ]; then
  need "nvcc (CUDA toolkit)" "no build from source: only a carried prebuilt library"
  HAVE_BUILD=0
fi
if ! "$PY" -c 'import setuptools' 2>/dev/null; then
  need "setuptools" "no build from source: only a carried prebuilt library"
  HAVE_BUILD=0
fi
# torch's builder runs `ninja` from PATH; the ninja module has its own.
if ! command -v ninja >/dev/null && ninja_dir=$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null); then
  export PATH="$ninja_dir:$PATH"
fi
command -v ninja >/dev/null || need "ninja" "the build compiles one file at a time"
HAVE_PYTEST=1
"$PY" -c 'import pytest' 2>/dev/null || { need "pytest" "test, sanitize and cpu skipped"; HAVE_PYTEST=0; }
HAVE_TQDM=1
"$PY" -c 'import tqdm' 2>/dev/null || { need "tqdm" "convbn cannot be imported (convbn.recalibrate): test, sanitize, bench, networks, cpu skipped"; HAVE_TQDM=0; }
"$PY" -c 'import numpy' 2>/dev/null || need "numpy" "tests/test_demo.py (CPU) cannot be collected"
"$PY" -c 'import matplotlib' 2>/dev/null || need "matplotlib" "nothing here (bench_cpu.py --plot only)"
command -v cmake >/dev/null || need "cmake" "cpu: no C++ library and programs (their tests skip)"
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/compute-sanitizer/compute-sanitizer" ]; then
  SANITIZER=$CUDA_HOME/compute-sanitizer/compute-sanitizer
fi
[ -n "$SANITIZER" ] || need "compute-sanitizer" "sanitize skipped"
if [ ${#missing[@]} -eq 0 ]; then
  say "prerequisites: all found"
else
  say "prerequisites missing:"
  for line in "${missing[@]}"; do say "  $line"; done
fi

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "== nvidia-smi"
  nvidia-smi 2>&1 || true
  echo "== torch"
  "$PY" -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| arch list", torch.cuda.get_arch_list())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")' 2>&1 || true
  echo "== CUDA_HOME=${CUDA_HOME:-none}"
  [ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version | tail -2
  [ -n "$SANITIZER" ] && "$SANITIZER" --version | tail -1
  echo "== ninja $(ninja --version 2>/dev/null || echo missing), cmake $(cmake --version 2>/dev/null | head -1 || echo missing)"
} > "$RESULTS/device.txt" 2>&1
say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo none); torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)"

if [ "$torch_state" = missing ] || [ "$torch_state" = cpu-build ]; then
  say "gpu_check: nothing to do without a CUDA build of torch"
  exit 1
fi

# ---- The library -----------------------------------------------------------
# python/convbn/_C*.so is a copy of prebuilt/_C*.so, whose BUILD_INFO says
# what it was built from (scripts/prebuilt.sh); a build here refreshes both.
library_registrations() {
  local t0=$SECONDS
  if "$PY" scripts/check_cuda_ops.py >> "$RESULTS/build.log" 2>&1; then
    report "CUDA registrations" "ok" $((SECONDS - t0)) "$(tail -1 "$RESULTS/build.log" | sed 's/^CUDA coverage: ok, //')"
  else
    report "CUDA registrations" "FAILED" $((SECONDS - t0)) "$(tail -1 "$RESULTS/build.log" | cut -c1-120) (build.log)"
    return 1
  fi
}

# The GPU's architecture, for a build here (TORCH_CUDA_ARCH_LIST wins).
arch_list() {
  [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && { echo "$TORCH_CUDA_ARCH_LIST"; return; }
  "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || true
}

build_library() {
  local log=$RESULTS/build.log fits arch
  touch "$log"
  if [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && fits=$(convbn_prebuilt_fits "$PY" 2>&1); then
    rm -f python/convbn/_C*.so
    cp "$CONVBN_PREBUILT_DIR"/_C*.so "$CONVBN_PREBUILT_DIR"/_build_info.py python/convbn/
    echo "== prebuilt library: $fits" >> "$log"
    report "build" "ok" 0 "prebuilt library: $fits"
  elif [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && [ ! -f "$CONVBN_PREBUILT_DIR/BUILD_INFO" ] &&
    compgen -G "python/convbn/_C*.so" >/dev/null; then
    report "build" "ok" 0 "python/convbn/_C*.so found here, without BUILD_INFO: sources and torch not checked"
  else
    [ "${GPU_CHECK_REBUILD:-0}" = 1 ] && fits="GPU_CHECK_REBUILD=1"
    echo "== not using a prebuilt library: $fits" >> "$log"
    if [ "$HAVE_BUILD" = 0 ]; then
      report "build" "skipped" 0 "no toolkit or setuptools here; prebuilt: $fits"
      return 1
    fi
    arch=$(arch_list)
    rm -f python/convbn/_C*.so
    run_step "${BUILD_TIMEOUT:-420}" "$log" env FORCE_CUDA=1 ${arch:+TORCH_CUDA_ARCH_LIST="$arch"} \
      "$PY" setup.py build_ext --inplace
    report "build" "$STEP_STATUS" "$STEP_SECS" "from source for ${arch:-the default archs of setup.py}, $MAX_JOBS jobs (prebuilt: $fits)"
    if [ "$STEP_STATUS" != ok ]; then
      tail -30 "$log"
      return 1
    fi
    [ -n "$arch" ] && convbn_save_prebuilt "$PY" "$(ls python/convbn/_C*.so)" "$arch" strip
  fi
  library_registrations || return 1
  # For a later call on a fresh machine: the library comes back with the
  # results, to be carried as prebuilt/.
  if [ "${GPU_CHECK_KEEP_LIBRARY:-0}" = 1 ] && [ -f "$CONVBN_PREBUILT_DIR/BUILD_INFO" ]; then
    mkdir -p "$RESULTS/prebuilt"
    cp "$CONVBN_PREBUILT_DIR"/_C*.so "$CONVBN_PREBUILT_DIR/_build_info.py" "$CONVBN_PREBUILT_DIR/BUILD_INFO" "$RESULTS/prebuilt/"
    say "library kept in $RESULTS/prebuilt/ (carry it as prebuilt/)"
  fi
}

# Builds or installs the library once, when a stage first needs it.
LIBRARY=unknown
need_library() {
  if [ "$LIBRARY" = unknown ]; then
    if build_library; then LIBRARY=ok; else LIBRARY=missing; fi
  fi
  [ "$LIBRARY" = ok ]
}

gpu_ready() { # STAGE: says why STAGE cannot run, if it cannot
  if [ "$torch_state" != ok ]; then
    report "$1" "skipped" 0 "no visible GPU"
  elif [ "$HAVE_PYTEST" = 0 ] && [ "$1" != bench ] && [ "$1" != networks ]; then
    report "$1" "skipped" 0 "no pytest"
  elif [ "$HAVE_TQDM" = 0 ]; then
    report "$1" "skipped" 0 "no tqdm: convbn cannot be imported"
  elif ! need_library; then
    report "$1" "skipped" 0 "no library (see build)"
  else
    return 0
  fi
  return 1
}

if has_stage build; then
  need_library || true
fi

# ---- CUDA tests ------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rfEs --tb=short --continue-on-collection-errors)
if has_stage test && gpu_ready test; then
  log=$RESULTS/test.log
  run_step "${TEST_CUDA_TIMEOUT:-180}" "$log" "${PYTEST[@]}" tests/test_cuda.py
  report "test: test_cuda.py" "$STEP_STATUS" "$STEP_SECS" "$(pytest_counts "$log" "$STEP_FROM")"
  run_step "${TEST_REST_TIMEOUT:-300}" "$log" "${PYTEST[@]}" tests --ignore=tests/test_cuda.py -k cuda
  report "test: -k cuda" "$STEP_STATUS" "$STEP_SECS" "$(pytest_counts "$log" "$STEP_FROM")"
fi

# ---- compute-sanitizer -----------------------------------------------------
if has_stage sanitize; then
  if [ -z "$SANITIZER" ]; then
    report "sanitize" "skipped" 0 "no compute-sanitizer"
  elif gpu_ready sanitize; then
    log=$RESULTS/sanitizer.log
    read -r -a files <<< "${SANITIZE_FILES:-tests/test_cuda.py}"
    read -r -a extra <<< "${SANITIZER_ARGS:-}"
    for tool in memcheck racecheck; do
      # Only kernels whose (mangled) name contains "convbn" (namespace
      # convbn::cuda) are instrumented; torch's and cuDNN's run as usual.
      # The caching allocator is off so that memcheck sees every buffer's
      # bounds. API errors inside torch are not convbn's: not reported.
      run_step "${SANITIZE_TIMEOUT:-240}" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --kernel-name "${SANITIZE_KERNELS:-kns=convbn}" --report-api-errors no \
        --error-exitcode 86 --print-limit 100 "${extra[@]}" \
        "${PYTEST[@]}" -x "${files[@]}" -k "${SANITIZE_K:-half_types or non_contiguous}"
      found=$(tail -n +"$STEP_FROM" "$log" | grep -E '(ERROR|RACECHECK) SUMMARY' | tail -1 | sed 's/^=* *//' || true)
      [ "$STEP_STATUS" = "FAILED (exit 86)" ] && STEP_STATUS="FAILED (errors)"
      report "sanitize: $tool" "$STEP_STATUS" "$STEP_SECS" "${found:-no sanitizer summary}; $(pytest_counts "$log" "$STEP_FROM")"
    done
  fi
fi

# ---- Benchmark -------------------------------------------------------------
if has_stage bench && gpu_ready bench; then
  read -r -a bench_args <<< "${BENCH_ARGS:-}"
  rm -f "$RESULTS/gpu_results.md"
  run_step "${BENCH_TIMEOUT:-300}" "$RESULTS/bench.log" "$PY" benchmarks/bench_gpu.py \
    --markdown "$RESULTS/gpu_results.md" "${bench_args[@]}"
  report "bench" "$STEP_STATUS" "$STEP_SECS" "gpu_results.md, bench.log"
fi
# Whole networks and the BN passes: appended to the same two files (the
# device tool brings back at most 8); the per-layer plot is drawn from
# bench.log afterwards (bench_gpu.py --plot-from).
if has_stage networks && gpu_ready networks; then
  read -r -a networks_args <<< "${NETWORKS_ARGS:-}"
  run_step "${NETWORKS_TIMEOUT:-540}" "$RESULTS/bench.log" "$PY" benchmarks/bench_gpu_networks.py \
    --markdown "$RESULTS/gpu_results.md" "${networks_args[@]}"
  report "networks" "$STEP_STATUS" "$STEP_SECS" "gpu_results.md, bench.log"
fi

# ---- CPU: the C++ programs and the CPU cases -------------------------------
if has_stage cpu; then
  log=$RESULTS/cpu.log
  if command -v cmake >/dev/null; then
    prefix=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
    # The C++ library with the CPU operators, installed as a CMake package,
    # and the deployment programs built against it, which
    # tests/test_torchscript.py and test_export.py run (no GoogleTest).
    run_step "${CMAKE_TIMEOUT:-300}" "$log" bash -c "cmake -S . -B build -DCONVBN_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH='$prefix' && cmake --build build -j $MAX_JOBS \
      && cmake --install build --prefix build/install \
      && cmake -S examples/cpp -B build/examples/cpp -DCMAKE_PREFIX_PATH='$PWD/build/install;$prefix' \
      && cmake --build build/examples/cpp -j $MAX_JOBS"
    report "cpu: cmake build" "$STEP_STATUS" "$STEP_SECS" "libconvbn.so, examples/cpp"
    [ -x build/examples/cpp/convbn_jit_infer ] && export CONVBN_BUILD_DIR="$PWD/build"
  else
    report "cpu: cmake build" "skipped" 0 "no cmake: the C++ program tests skip"
  fi
  if [ "$HAVE_PYTEST" = 1 ] && [ "$HAVE_TQDM" = 1 ] && need_library; then
    run_step "${CPU_TEST_TIMEOUT:-540}" "$log" "${PYTEST[@]}" tests -k "not cuda"
    report "cpu: -k 'not cuda'" "$STEP_STATUS" "$STEP_SECS" "$(pytest_counts "$log" "$STEP_FROM")"
  else
    report "cpu: tests" "skipped" 0 "no pytest, tqdm or library"
  fi
fi

echo
echo "gpu_check: results in $RESULTS; this run's summary:"
tail -n +"$SUMMARY_FROM" "$SUMMARY"
# A GPU check that could not use a GPU did not pass.
if [ "$torch_state" != ok ] && { has_stage test || has_stage sanitize || has_stage bench || has_stage networks; }; then
  echo "gpu_check: no visible GPU, so nothing was tested on one"
  exit 1
fi
[ "$FAILURES" = 0 ]
