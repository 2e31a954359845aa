#!/usr/bin/env bash
# Wall time and peak RSS (/usr/bin/time -v) of merging three synthetic experts into a base.
#   bash bench/engine_bench.sh [PRESET] [METHOD ...]     e.g.  bash bench/engine_bench.sh 0.5b task_arithmetic ties
# Writes bench/results/engine-PRESET-METHOD.txt (machine, command, inputs size, time -v output).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-0.5b}; shift || true
METHODS=${*:-task_arithmetic ties}
WORK=bench/work/$PRESET
[ -f "$WORK/expert-3/model.safetensors.index.json" ] || python3 tools/make_toy_models.py "$WORK" --preset "$PRESET" --experts 3 --shard-size 1GB
inputs=$(du -cb "$WORK"/base/*.safetensors "$WORK"/expert-*/*.safetensors | tail -1 | cut -f1)
for m in $METHODS; do
  out=bench/work/out-$PRESET-$m
  rm -rf "$out"
  cmd="streammerge merge --quiet --device cpu --base $WORK/base --expert $WORK/expert-1 --expert $WORK/expert-2 --expert $WORK/expert-3 --method $m --out $out"
  res=bench/results/engine-$PRESET-$m.txt
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB RAM, $(python3 -c 'import platform;print(platform.processor() or platform.machine())'), torch $(python3 -c 'import torch;print(torch.__version__)')"
    echo "command: $cmd"
    echo "input safetensors bytes (base + 3 experts): $inputs"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "page cache: dropped before the run" || echo "page cache: not dropped (no permission)"
    /usr/bin/time -v $cmd 2>&1
    echo "output bytes: $(du -cb "$out"/*.safetensors | tail -1 | cut -f1)"
  } > "$res" 2>&1
  grep -E "Elapsed|Maximum resident" "$res" | sed "s/^/$m: /"
done
