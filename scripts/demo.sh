#!/usr/bin/env bash
# The README's first command: installs what is missing, builds the extension
# and trains d2l's LeNet-BN on Fashion-MNIST with nn layers and with
# convbn.fuse (examples/demo.py; it installs the Debian dataset package
# when it is missing and it can). Arguments go to the demo (--epochs, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
python3 -m pip install -q --no-build-isolation -e .
python3 examples/demo.py "$@"
