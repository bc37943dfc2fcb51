# The prebuilt CUDA library that scripts/cuda_build_check.sh leaves for the
# GPU machine, and scripts/gpu_check.sh's test of whether it fits there.
# Sourced; run from the repository root.
#
#   prebuilt/_C.abi3.so   convbn's op library, with CUDA kernels
#   prebuilt/_build_info.py  what setup.py wrote beside it: the torch it was
#                         built against, which import convbn checks
#   prebuilt/BUILD_INFO   key=value lines: torch (torch.__version__), torch_cuda
#                         (torch.version.cuda), nvcc, arch_list
#                         (TORCH_CUDA_ARCH_LIST), sources (convbn_sources_hash),
#                         and, for people, built and git.

CONVBN_PREBUILT_DIR=${CONVBN_PREBUILT_DIR:-prebuilt}

# A short hash of everything the library is built from.
convbn_sources_hash() {
  find setup.py csrc cuda -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) |
    LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

# convbn_prebuilt_fits PYTHON: succeeds when $CONVBN_PREBUILT_DIR holds a
# library built for PYTHON's torch (same version and CUDA version), for an
# architecture that runs on its first GPU, from the sources of this tree.
# Prints why not otherwise.
convbn_prebuilt_fits() {
  local py=$1 info="$CONVBN_PREBUILT_DIR/BUILD_INFO"
  if ! compgen -G "$CONVBN_PREBUILT_DIR/_C*.so" >/dev/null || [ ! -f "$info" ] ||
    [ ! -f "$CONVBN_PREBUILT_DIR/_build_info.py" ]; then
    echo "no prebuilt library ($CONVBN_PREBUILT_DIR/_C*.so, _build_info.py and BUILD_INFO)"
    return 1
  fi
  local sources out rc=0
  sources=$(convbn_sources_hash)
  out=$("$py" - "$info" "$sources" 2>/dev/null <<'EOF'
import sys

import torch

info = dict(line.split("=", 1) for line in open(sys.argv[1]).read().splitlines() if "=" in line)
problems = []
if info.get("torch") != torch.__version__ or info.get("torch_cuda") != str(torch.version.cuda):
    problems.append(
        f"built for torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
        f"this is torch {torch.__version__} (CUDA {torch.version.cuda})"
    )
if info.get("sources") != sys.argv[2]:
    problems.append("the sources changed since it was built")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability(0)
    device = major * 10 + minor
    runs = False
    for arch in info.get("arch_list", "").replace(" ", ";").split(";"):
        if not arch:
            continue
        number = arch.split("+")[0]
        arch_major, arch_minor = int(number.split(".")[0]), int(number.split(".")[1][0])
        cc = arch_major * 10 + arch_minor
        # Machine code runs on its own architecture and on later minor ones of
        # the same major (not the "a" variants); the driver compiles PTX for
        # any newer one.
        runs = runs or cc == device
        runs = runs or (arch_major == major and arch_minor <= minor and not number.endswith("a"))
        runs = runs or (arch.endswith("+PTX") and cc <= device)
    if not runs:
        problems.append(f"built for {info.get('arch_list')}, the GPU is sm_{device}")
if problems:
    print("; ".join(problems))
    sys.exit(1)
print(f"torch {info['torch']}, arch {info['arch_list']}, sources {info['sources']}")
EOF
) || rc=$?
  echo "${out:-could not compare $info with the torch of $py}"
  return "$rc"
}

# convbn_save_prebuilt PYTHON LIBRARY ARCH_LIST [STRIP]: copies LIBRARY and
# the _build_info.py beside it to $CONVBN_PREBUILT_DIR (the library without
# debug information if STRIP is "strip") and writes BUILD_INFO for PYTHON's
# torch, $CUDA_HOME's nvcc and ARCH_LIST.
convbn_save_prebuilt() {
  local py=$1 library=$2 arch_list=$3 how=${4:-copy} dest
  mkdir -p "$CONVBN_PREBUILT_DIR"
  rm -f "$CONVBN_PREBUILT_DIR"/_C*.so
  cp "$(dirname "$library")/_build_info.py" "$CONVBN_PREBUILT_DIR/"
  dest="$CONVBN_PREBUILT_DIR/$(basename "$library")"
  if [ "$how" = strip ] && command -v strip >/dev/null; then
    strip --strip-debug -o "$dest" "$library"
  else
    cp "$library" "$dest"
  fi
  {
    "$py" -c 'import torch; print(f"torch={torch.__version__}\ntorch_cuda={torch.version.cuda}")'
    echo "nvcc=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
    echo "arch_list=$arch_list"
    echo "sources=$(convbn_sources_hash)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), python $("$py" -c 'import platform; print(platform.python_version())')"
    echo "git=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- setup.py csrc cuda 2>/dev/null || echo ' (with uncommitted changes)')"
  } > "$CONVBN_PREBUILT_DIR/BUILD_INFO"
}
