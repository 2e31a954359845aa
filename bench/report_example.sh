#!/usr/bin/env bash
# The README's `streammerge report` example: OrthoMerge-C (the default) of three synthetic
# experts with row conflicts (tools/make_toy_models.py --preset small --shared 0.7), recorded
# with --report, summarised and plotted into bench/results/report-example/ (needs matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
work=bench/.work/report-example
out=bench/results/report-example
[ -d "$work/toys/expert-3" ] || python tools/make_toy_models.py "$work/toys" --preset small --experts 3 --shared 0.7 >/dev/null
rm -rf "$work/merged" "$out"
mkdir -p "$out"
streammerge merge --quiet --device cpu --base "$work/toys/base" --expert "$work/toys/expert-1" --expert "$work/toys/expert-2" \
    --expert "$work/toys/expert-3" --method orthomerge --out "$work/merged" --report "$out/report.json"
streammerge report "$out/report.json" | tee "$out/summary.md"
streammerge report "$out/report.json" --plots "$out" >/dev/null
