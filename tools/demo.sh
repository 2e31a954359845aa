#!/usr/bin/env bash
# Set up streammerge and run a demo merge on toy models it generates itself (no download).
#   bash tools/demo.sh [METHOD]      METHOD: ties (default), task_arithmetic, dare_ties, linear, ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PyTorch first, the CPU build where there is no GPU (a bare `torch` would fetch a multi-GB CUDA build)
bash tools/install_torch.sh
$PY -m pip install -q -e .
# experts whose rows conflict (--shared 0.7), as fine-tunes of one base do: OrthoMerge then rotates
$PY tools/make_toy_models.py demo --preset small --experts 3 --shared 0.7 --shard-size 2MB
rm -rf demo/merged
METHOD=${1:-ties}
case "$METHOD" in  # mergekit's gta family and multislerp need a weight per model (mergekit does too)
    gta | breadcrumbs* | della* | multislerp) WEIGHTS=(--weight 1 --weight 1 --weight 1) ;;
    *) WEIGHTS=() ;;
esac
$PY -m streammerge.cli merge --base demo/base \
    --expert demo/expert-1 --expert demo/expert-2 --expert demo/expert-3 "${WEIGHTS[@]}" \
    --method "$METHOD" --out demo/merged --shard-size 2MB --report demo/report.json
ls -l demo/merged
# what explains the merge, per tensor kind (OrthoMerge: the rotation's share of the update)
$PY -m streammerge.cli report demo/report.json
