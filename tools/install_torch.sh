#!/usr/bin/env bash
# Install PyTorch 2.13.0 into the current Python unless a torch is already there. Without an NVIDIA
# GPU it asks for the CPU build explicitly: a plain `pip install torch` on Linux fetches the
# multi-GB CUDA build. Where PyTorch's CPU index cannot be reached, pip's own configuration decides
# (a machine with a local CPU wheel, as this project's, or a plain PyPI install).
set -euo pipefail
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null && exit 0
if command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" != "Linux" ]; then
    exec $PY -m pip install -q torch==2.13.0  # CUDA where there is a GPU; macOS and Windows wheels are CPU builds
fi
$PY -m pip install -q --timeout 15 --retries 0 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 2>/dev/null \
    || $PY -m pip install -q torch==2.13.0
$PY -c "import torch; print(f'installed torch {torch.__version__}')"
