#!/usr/bin/env bash
# Set up streammerge with its test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PyTorch first, the CPU build where there is no GPU (a bare `torch` would fetch a multi-GB CUDA build)
bash tools/install_torch.sh
$PY -m pip install -q -e ".[test,crosscheck]"
# mergekit 0.1.5 in a venv of its own for the cross-check tests (they skip, saying so, without it)
$PY tools/mergekit_env.py >/dev/null || echo "mergekit unavailable: tests/test_mergekit_crosscheck.py will skip"
$PY -m pytest -q -p no:cacheprovider "$@"
