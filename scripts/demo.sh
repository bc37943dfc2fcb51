#!/usr/bin/env bash
# The README's first command: installs what is missing, builds the extension
# and trains a small conv net with ConvBN2d against the nn pair.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
python3 -m pip install -q --no-build-isolation -e .
python3 examples/demo.py "$@"
