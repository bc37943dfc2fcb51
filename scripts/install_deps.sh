#!/usr/bin/env bash
# Installs what convbn needs to build and test, on a fresh Debian machine:
# torch (the CPU build 2.13.0 unless a torch is already installed), pytest
# and friends from PyPI, pytorchcv and monai (--no-deps) for the real-model tests, onnx, onnxruntime
# and onnxscript for the ONNX export tests, GoogleTest and CMake from Debian. Skips what is there.
set -euo pipefail

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
missing=()
for module in pytest numpy matplotlib tqdm; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${missing[@]}"
fi
# Third-party models for tests/test_real_models.py. Both declare torch (and
# pytorchcv torchvision, which has no CPU build here): --no-deps keeps pip
# from resolving a second torch; what they import besides is listed here.
for dep in requests six; do
  "$PY" -c "import $dep" 2>/dev/null || "$PY" -m pip install -q "$dep"
done
"$PY" -c "import pytorchcv" 2>/dev/null || "$PY" -m pip install -q --no-deps "pytorchcv==0.0.74"
"$PY" -c "import monai" 2>/dev/null || "$PY" -m pip install -q --no-deps "monai==1.6.1"
# ONNX export tests (tests/test_onnx.py): onnx, onnxruntime, and onnxscript,
# which torch's default (dynamo-based) exporter writes the graph with. None
# of them declares torch, so pip resolves their dependencies normally.
onnx_missing=()
for spec in "onnx==1.23.2" "onnxruntime==1.32.0" "onnxscript==0.7.2"; do
  "$PY" -c "import ${spec%%==*}" 2>/dev/null || onnx_missing+=("$spec")
done
if [ ${#onnx_missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${onnx_missing[@]}"
fi

need_apt=()
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "convbn: please install ${need_apt[*]} (Debian: apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi
