#!/usr/bin/env bash
# Set up streammerge with its test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU wheel of torch that lies on disk; a bare `torch` would fetch a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,crosscheck]"
# mergekit 0.1.5 in a venv of its own for the cross-check tests (they skip, saying so, without it)
$PY tools/mergekit_env.py >/dev/null || echo "mergekit unavailable: tests/test_mergekit_crosscheck.py will skip"
$PY -m pytest -q -p no:cacheprovider "$@"
