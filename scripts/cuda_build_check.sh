#!/usr/bin/env bash
# Builds and links convbn's CUDA extension against a CUDA build of torch, on
# a machine without a GPU: in a virtual environment outside the repository
# (the system python and its torch are left alone), with nvcc. Then loads the
# library there and checks that every convbn operator with a CPU kernel has
# a CUDA one (scripts/check_cuda_ops.py). The library, stripped of debug
# information, goes to prebuilt/ with prebuilt/BUILD_INFO (see
# scripts/prebuilt.sh), to be carried to the GPU machine: scripts/gpu_check.sh
# uses it when it fits that machine's torch, GPU and sources.
#
#   bash scripts/cuda_build_check.sh
#
# Environment:
#   TORCH_VERSION         torch to build against (default 2.11.0, the GPU
#                         machine's; 2.14.1 installs from the local index)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (the GPU machine's H200)
#   TORCH_INDEX_URL       a pip index for torch (e.g. a download.pytorch.org/whl/cuXYZ)
#   CONVBN_VENV_ROOT      where the environments live (default ~/.cache/convbn;
#                         one per torch version: cuda-venv-<version>)
#   CONVBN_PREBUILT_DIR   where the library goes (default prebuilt/)
#   MAX_JOBS              parallel compile jobs (default nproc)
#   PYTHON                the interpreter the environment is made from (python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
VENV=${CONVBN_VENV_ROOT:-$HOME/.cache/convbn}/cuda-venv-$TORCH_VERSION
BUILD=$ROOT/build/cuda-torch-$TORCH_VERSION
# shellcheck source=scripts/prebuilt.sh
source scripts/prebuilt.sh
start=$SECONDS

step() { echo "== cuda_build_check: $*"; }
fail() {
  echo "cuda_build_check: FAILED: $*" >&2
  exit 1
}

# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh
[ -n "${CUDA_HOME:-}" ] || fail "no CUDA toolkit (nvcc) found"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"

if ! "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  step "installing torch==$TORCH_VERSION in $VENV (a CUDA build with its nvidia-* wheels: several GB)"
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  t0=$SECONDS
  if ! "$PY" -m pip install -q "${index[@]}" "torch==$TORCH_VERSION" > "$VENV/pip-torch.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip-torch.log" | tail -15 >&2
    fail "could not install torch==$TORCH_VERSION (log: $VENV/pip-torch.log). TORCH_VERSION=2.14.1 installs from the local index."
  fi
  step "torch installed in $((SECONDS - t0)) s"
fi
# What the build needs, and tqdm, which `import convbn` needs.
missing=()
for module in ninja setuptools wheel numpy tqdm; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi

read -r TORCH_FULL TORCH_CUDA < <("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')
[ "$TORCH_CUDA" != None ] || fail "torch $TORCH_FULL in $VENV is a CPU build"
if [ "${TORCH_CUDA%%.*}" != "${NVCC_VERSION%%.*}" ]; then
  fail "torch $TORCH_FULL was built with CUDA $TORCH_CUDA, nvcc ($CUDA_HOME) is $NVCC_VERSION: torch's extension builder refuses a different major version"
fi

step "building the extension for torch $TORCH_FULL (CUDA $TORCH_CUDA), nvcc $NVCC_VERSION, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"
mkdir -p "$BUILD"
t0=$SECONDS
if ! FORCE_CUDA=1 "$PY" setup.py -q build_ext --force --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" \
  > "$BUILD/build.log" 2>&1; then
  grep -E "error|Error" "$BUILD/build.log" | head -40 >&2 || true
  tail -20 "$BUILD/build.log" >&2
  fail "the build failed (log: $BUILD/build.log)"
fi
build_secs=$((SECONDS - t0))
library=$(ls "$BUILD"/lib/convbn/_C*.so)
step "built $library in $build_secs s ($(du -h "$library" | cut -f1))"

# Load it, as the package does, and check the CUDA registrations.
step "loading it with torch $TORCH_FULL and checking the operators"
stage=$BUILD/package
rm -rf "$stage" && mkdir -p "$stage/convbn"
cp python/convbn/*.py "$stage/convbn/"
# The library and the _build_info.py setup.py wrote beside it (the tree's,
# if any, describes another build).
cp "$library" "$(dirname "$library")/_build_info.py" "$stage/convbn/"
PYTHONPATH=$stage "$PY" -c 'import convbn' || fail "import convbn failed with the built library"
coverage=0
PYTHONPATH=$stage "$PY" scripts/check_cuda_ops.py | tee "$BUILD/ops.txt" || coverage=1

# The copy that travels: without debug information.
convbn_save_prebuilt "$PY" "$library" "$TORCH_CUDA_ARCH_LIST" strip
carried="$CONVBN_PREBUILT_DIR/$(basename "$library")"
PYTHONPATH=$stage "$PY" -c 'import sys, torch; torch.ops.load_library(sys.argv[1])' "$carried" ||
  fail "the stripped library does not load"

echo
echo "cuda_build_check summary"
echo "  torch        $TORCH_FULL (CUDA $TORCH_CUDA), in $VENV"
echo "  nvcc         $NVCC_VERSION ($CUDA_HOME)"
echo "  arch list    $TORCH_CUDA_ARCH_LIST"
echo "  build        ok, $build_secs s, $MAX_JOBS jobs (log: $BUILD/build.log; ninja reuses the objects of earlier builds there)"
echo "  library      $(du -h "$library" | cut -f1) as built, $(du -h "$carried" | cut -f1) without debug info: $carried"
echo "  operators    $(tail -1 "$BUILD/ops.txt")"
echo "  BUILD_INFO   $CONVBN_PREBUILT_DIR/BUILD_INFO:"
sed 's/^/                 /' "$CONVBN_PREBUILT_DIR/BUILD_INFO"
echo "  total        $((SECONDS - start)) s"
echo "For the GPU machine, carry $CONVBN_PREBUILT_DIR (e.g. carry=[\"prebuilt\"]) and run scripts/gpu_check.sh there."
exit "$coverage"
