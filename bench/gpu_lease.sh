#!/usr/bin/env bash
# One GPU lease's measurements, most wanted first, each step cut off so that the whole fits in
# BUDGET seconds (default 560) and every record written so far comes back:
#   1. the CUDA tests (tests/test_cuda.py);
#   2. the 8B slice (bench/slice_gpu.py): the read floor (cat, cold and warm), then task arithmetic
#      and TIES with the page cache dropped, this checkout's code against BASELINE's (a copy of
#      another commit's streammerge/ package, when that folder exists), alternating; 2a: task
#      arithmetic reading through the page cache (a copy of this checkout with O_DIRECT reads off),
#      then this checkout again;
#   3. task arithmetic on the slice under py-spy (bench/profile_merge.py --device cuda), when
#      py-spy is installed or its wheel is in .whl/;
#   4. bench/gpu_check.py without its end-to-end step;
#   5. OrthoMerge-G on the slice.
# Usage on the device machine, from the project folder: OUT=DIR BASELINE=.baseline bash bench/gpu_lease.sh
# (.baseline: `mkdir .baseline && git archive COMMIT streammerge | tar -x -C .baseline`, carried)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?OUT: the folder records go to}
BUDGET=${BUDGET:-560}
BASELINE=${BASELINE:-}
WORK=${WORK:-/tmp/slice}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
step() { echo "== $* ($(left) s left, load $(cut -d' ' -f1 /proc/loadavg))"; }
# within RESERVE: the command, cut off RESERVE seconds before the budget ends (skipped when none is left)
within() {
    local n=$(($(left) - $1))
    shift
    if [ "$n" -gt 5 ]; then timeout "$n" "$@"; else echo "skipped for time: $*"; fi
}
# SLICE_ARGS: more for slice_gpu.py (a dry run here: SLICE_ARGS="--preset tiny --device cpu" DEVICE=cpu)
DEVICE=${DEVICE:-cuda}
# shellcheck disable=SC2206
SLICE=(python3 bench/slice_gpu.py --work "$WORK" --out "$OUT/slice-8b-gpu.json" --cold ${SLICE_ARGS:-})

if ! command -v py-spy >/dev/null && ls .whl/py_spy-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/py_spy-*.whl \
        && export PATH="/tmp/site/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step "1. CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -15
step "2. the 8B slice: inputs, read floor, task arithmetic"
within 60 "${SLICE[@]}" --floor --runs task_arithmetic
if [ -n "$BASELINE" ] && [ -d "$BASELINE" ]; then
    within 60 "${SLICE[@]}" --runs task_arithmetic --code "$BASELINE" --tag @baseline
fi
step "2a. task arithmetic with its inputs read through the page cache (a copy with prefetch.DIRECT off)"
VARIANT=/tmp/variant-no-direct
rm -rf "$VARIANT" && mkdir -p "$VARIANT" && cp -r streammerge "$VARIANT"/
sed -i 's/^DIRECT = .*/DIRECT = False  # gpu_lease.sh step 2a/' "$VARIANT/streammerge/prefetch.py"
if grep -q "^DIRECT = False" "$VARIANT/streammerge/prefetch.py"; then
    within 60 "${SLICE[@]}" --runs task_arithmetic --code "$VARIANT" --tag @no-direct
    within 60 "${SLICE[@]}" --runs task_arithmetic --tag @again
else
    echo "skipped: prefetch.DIRECT not found"
fi
if command -v py-spy >/dev/null; then
    step "3. task arithmetic under py-spy"
    experts=$(for i in 1 2 3 4 5; do printf -- "--expert %s/expert-%s " "$WORK" "$i"; done)
    # shellcheck disable=SC2086
    within 60 python3 bench/profile_merge.py --tag ta-8b-slice-cuda --device "$DEVICE" -- \
        --base "$WORK/base" $experts --method task_arithmetic --max-gpu-memory 22GB --max-ram 12GB
    cp bench/results/profile-ta-8b-slice-cuda.md bench/.work/profile-ta-8b-slice-cuda.json "$OUT/" 2>/dev/null
fi
step "2b. TIES"
within 60 "${SLICE[@]}" --runs ties
if [ -n "$BASELINE" ] && [ -d "$BASELINE" ]; then
    within 60 "${SLICE[@]}" --runs ties --code "$BASELINE" --tag @baseline
fi
step "4. gpu_check (no end-to-end step)"
within 30 python3 bench/gpu_check.py --skip-end-to-end --out "$OUT/gpu-check.json"
step "5. OrthoMerge-G on the slice"
within 5 "${SLICE[@]}" --runs orthomerge-G
step "done"
