#!/usr/bin/env bash
# Create .venv and install detserve with everything needed to build, serve and test.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, onnxruntime, tritonclient, pytriton; print('detserve env ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
