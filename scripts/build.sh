#!/usr/bin/env bash
# Builds the Python extension (editable install) and the C++ library and
# GoogleTest binary (CMake, in build/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS=$JOBS
"$PY" -m pip install -q --no-build-isolation -e .
cmake -S . -B build -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build build -j "$JOBS"
