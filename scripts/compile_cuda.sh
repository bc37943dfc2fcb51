#!/usr/bin/env bash
# Compiles every cuda/*.cu file to an object with nvcc against the installed
# torch's headers, so a CUDA compile error fails CI on a machine without a
# GPU (and without a CUDA build of torch). Nothing is linked or run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null; then
  echo "compile_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
ARCH=${CONVBN_CUDA_ARCH:-90}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A CPU build of torch ships c10/cuda's headers but not the one CUDA builds
# generate; for this compile-only check, supply it as a CUDA build has it.
extra_include=()
if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/include/c10/cuda/impl"
  echo '#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS' > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
  extra_include=(-I"$out/include")
fi
shopt -s nullglob
files=(cuda/*.cu)
for f in "${files[@]}"; do
  echo "nvcc -c $f (sm_$ARCH)"
  nvcc -c "$f" -o "$out/$(basename "$f").o" -std=c++20 -O2 \
    -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
    -Icsrc "${extra_include[@]}" -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    --expt-relaxed-constexpr -Xcompiler -fPIC
done
echo "compile_cuda: ${#files[@]} CUDA file(s) compiled"
