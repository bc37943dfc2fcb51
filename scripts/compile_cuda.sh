#!/usr/bin/env bash
# Compile-only checks, so that CI catches on a machine without a GPU (and
# without a CUDA build of torch) what would break the builds elsewhere.
# Nothing is linked or run.
#
#  - every cuda/*.cu is compiled to an object with nvcc against the installed
#    torch's headers, as C++17 (torch <= 2.12's extension builder: the GPU
#    machine's torch 2.11) and as C++20 (CMake; torch >= 2.13's builder);
#  - every csrc/**/*.cpp is checked to compile as C++17 (g++ -fsyntax-only)
#    with the defines setup.py's build gives it.
#
# Torch's headers are included as system headers: torch 2.13's use C++20
# features that GCC accepts in C++17 mode with a warning; convbn's own code
# must not (-Wpedantic -Werror=c++20-extensions). Jobs run in parallel: MAX_JOBS
# (default: nproc). CONVBN_CUDA_ARCH: the sm_ of the nvcc runs (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}
ARCH=${CONVBN_CUDA_ARCH:-90}
export CXX=${CXX:-g++}
start=$SECONDS

# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh
read -r TORCH_DIR ABI PY_INCLUDE < <("$PY" -c '
import os, sysconfig, torch
print(os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI), sysconfig.get_paths()["include"])') || true
[ -n "${PY_INCLUDE:-}" ] || { echo "compile_cuda: cannot import torch with $PY" >&2; exit 1; }

export WORK
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/log" "$WORK/obj"
# A CPU build of torch ships c10/cuda's headers but not the one CUDA builds
# generate; for this compile-only check, supply it as a CUDA build has it.
if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$WORK/include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$WORK/include/c10/cuda/impl/cuda_cmake_macros.h"
fi

# Flags shared by both compilers, then each one's, as response files.
common="-Icsrc -isystem $WORK/include -isystem $TORCH_DIR/include
-isystem $TORCH_DIR/include/torch/csrc/api/include
-D_GLIBCXX_USE_CXX11_ABI=$ABI -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H"
printf '%s\n' "$common" "-isystem $PY_INCLUDE -DPy_LIMITED_API=0x03090000 -DNDEBUG -Wall -Wpedantic -Werror=c++20-extensions" \
  > "$WORK/cxx.rsp"
printf '%s\n' "$common" "-O2 -gencode arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr
-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC" \
  > "$WORK/nvcc.rsp"

# The C++ checks share a precompiled header of the torch headers most files
# include (about three times faster). A file that defines or tests anything
# before its first #include is checked without it.
export PCH=$WORK/pch/torch.h
mkdir -p "$WORK/pch"
printf '#include <ATen/ATen.h>\n#include <torch/library.h>\n#include <torch/autograd.h>\n' > "$PCH"

# One job: KIND (nvcc, cxx, or pch: the precompiled header), STD (17 or
# 20), FILE. Prints one line; the compiler's output stays in a log, shown
# at the end if there is any.
compile_one() {
  local kind=$1 std=$2 file=$3 t0=$SECONDS
  local name="$kind-c++$std-${file//\//_}"
  local log="$WORK/log/$name.log"
  local status=ok pch=()
  if [ "$kind" = nvcc ]; then
    "$CUDA_HOME/bin/nvcc" -c "$file" -o "$WORK/obj/$name.o" -std=c++"$std" --options-file "$WORK/nvcc.rsp" > "$log" 2>&1 ||
      status=FAILED
  elif [ "$kind" = pch ]; then
    # Without it the C++ checks are only slower: not a failure.
    "$CXX" -x c++-header -std=c++"$std" @"$WORK/cxx.rsp" "$file" -o "$file.gch" > "$log" 2>&1 ||
      { status=skipped; rm -f "$file.gch"; }
    touch "$file.done"
    file="(precompiled torch headers)"
  else
    if grep -m1 -E '^[[:space:]]*#[[:space:]]*[a-z]+' "$file" | grep -qE '#[[:space:]]*include'; then
      while [ ! -e "$PCH.done" ]; do sleep 1; done
      [ -e "$PCH.gch" ] && pch=(-include "$PCH" -Winvalid-pch)
    fi
    "$CXX" -fsyntax-only -std=c++"$std" @"$WORK/cxx.rsp" "${pch[@]}" "$file" > "$log" 2>&1 || status=FAILED
  fi
  [ "$status" != FAILED ] || mv "$log" "$log.failed"
  printf '  %-7s %-4s -std=c++%s %s (%d s)\n' "$status" "$kind" "$std" "$file" $((SECONDS - t0))
  [ "$status" != FAILED ]
}
export -f compile_one

# The precompiled header and the longest jobs first: nvcc, then the C++ files.
jobs=("pch 17 $PCH")
if [ -n "${CUDA_HOME:-}" ]; then
  for f in cuda/*.cu; do
    [ -e "$f" ] && jobs+=("nvcc 17 $f" "nvcc 20 $f")
  done
else
  echo "compile_cuda: no CUDA toolkit, so no nvcc check (the C++17 check of csrc/ still runs)"
fi
while IFS= read -r f; do
  jobs+=("cxx 17 $f")
done < <(find csrc -name '*.cpp' | sort)

echo "compile_cuda: ${#jobs[@]} compile jobs, $JOBS at a time (torch $TORCH_DIR, sm_$ARCH)"
failed=0
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'compile_one "$@"' _ || failed=1

shopt -s nullglob
for log in "$WORK"/log/*.log.failed "$WORK"/log/*.log; do
  [ -s "$log" ] || continue
  name=$(basename "$log")
  echo "----- ${name%%.log*}: $([[ $log == *.failed ]] && echo FAILED || echo warnings) -----"
  cat "$log"
done
if [ "$failed" != 0 ]; then
  echo "compile_cuda: FAILED ($(ls "$WORK"/log/*.failed | wc -l) of ${#jobs[@]} jobs; logs above), $((SECONDS - start)) s" >&2
  exit 1
fi
echo "compile_cuda: ${#jobs[@]} jobs ok, $((SECONDS - start)) s"
