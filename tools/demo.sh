#!/usr/bin/env bash
# Set up streammerge and run a demo merge on toy models it generates itself (no download).
#   bash tools/demo.sh [METHOD]      METHOD: ties (default), task_arithmetic, dare_ties, linear, ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU wheel of torch that lies on disk; a bare `torch` would fetch a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e .
$PY tools/make_toy_models.py demo --preset small --experts 3 --shard-size 2MB
rm -rf demo/merged
$PY -m streammerge.cli merge --base demo/base \
    --expert demo/expert-1 --expert demo/expert-2 --expert demo/expert-3 \
    --method "${1:-ties}" --out demo/merged --shard-size 2MB
ls -l demo/merged
