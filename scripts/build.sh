#!/usr/bin/env bash
# Builds the Python extension (editable install), the C++ library and
# GoogleTest binary (CMake, in build/), installs the library as a CMake
# package (build/install) and builds the deployment programs against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS=$JOBS
"$PY" -m pip install -q --no-build-isolation -e .
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# lib/, not lib64/ where a distribution defaults to it: the tests look there.
cmake -S . -B build -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_INSTALL_LIBDIR=lib >/dev/null
cmake --build build -j "$JOBS"
# The CMake package, installed as a C++ user would, and the deployment
# programs (examples/cpp) built against it with find_package(convbn).
cmake --install build --prefix build/install >/dev/null
cmake -S examples/cpp -B build/examples/cpp -DCMAKE_PREFIX_PATH="$PWD/build/install;$TORCH_PREFIX" >/dev/null
cmake --build build/examples/cpp -j "$JOBS"
