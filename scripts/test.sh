#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything
# (the Python extension, libconvbn.so, the GoogleTest binary, the C++
# deployment programs), then runs the GoogleTest suite (through ctest) and
# the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
# CUDA kernels cannot run here but must compile: nvcc checks every cuda/*.cu.
bash scripts/compile_cuda.sh
(cd build && ctest --output-on-failure)
# The deployment tests run the C++ programs built above, and fail if missing.
export CONVBN_BUILD_DIR="$PWD/build"
# The numeric suites once more on the portable (non-AVX2) CPU kernels.
CONVBN_CPU_CAPABILITY=default python3 -m pytest -q tests/test_parity.py tests/test_autograd.py tests/test_linear_bn.py
python3 -m pytest -q tests "$@"
