#!/usr/bin/env python3
"""Peak memory of a Ray shard task, this checkout against the one before the engine redesign.

    python bench/ray_task_memory.py --baseline d8015db --pairs 2

Before the redesign (#23) every Ray task rebuilt the whole merge — re-validating the recipe,
re-opening and checking every input, re-planning the whole model — to write its one shard; now a
task opens the inputs and receives the driver's decisions for its shard. Both checkouts merge the
same inputs (`tools/make_toy_models.py --preset 0.5b --layers 4 --experts 3 --shared 0.7`, TIES
at model scope, `--shard-size 150MB`, `--ray local`: a private one-node cluster), alternating,
page cache dropped before each run. Recorded: wall time, each task process's peak anonymous RSS
(sampled from /proc every 0.2 s, as bench/ray_scaling.py does), and whether the outputs are
byte-identical. The baseline runs from a `git worktree` of that commit (created under bench/.work).
Results: bench/results/ray-task-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402
from common import drop_caches, write_results  # noqa: E402
from ray_scaling import WorkerPeaks  # noqa: E402

WORK = os.path.join(HERE, ".work", "ray-task-memory")


def merge(checkout: str, models: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "streammerge.cli", "merge", "--quiet", "--device", "cpu"]
    cmd += ["--base", os.path.join(models, "base")]
    for i in (1, 2, 3):
        cmd += ["--expert", os.path.join(models, f"expert-{i}")]
    return cmd + ["--method", "ties", "--ties-scope", "model", "--out", out, "--shard-size", "150MB", "--ray", "local"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="d8015db", help="the commit before the redesign")
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    models = os.path.join(WORK, "0.5b-L4")
    if not os.path.exists(os.path.join(models, "expert-3", "model.safetensors.index.json")):
        toy = [models, "--preset", "0.5b", "--layers", "4", "--experts", "3", "--shared", "0.7", "--shard-size", "1GB"]
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_toy_models.py"), *toy], check=True)
    baseline = common.checkout(args.baseline, os.path.join(WORK, f"checkout-{args.baseline}"))
    runs = []
    for round_ in range(args.pairs):
        for label, checkout in (("before", baseline), ("after", ROOT)):
            out = os.path.join(WORK, f"out-{label}")
            subprocess.run(["rm", "-rf", out])
            drop_caches()
            load = os.getloadavg()[0]
            peaks = WorkerPeaks()
            peaks.start()
            start = time.perf_counter()
            # -m runs the checkout's own package: its folder comes first on the path
            r = subprocess.run(merge(checkout, models, out), cwd=checkout, capture_output=True, text=True)
            wall = time.perf_counter() - start
            peaks.stopped.set()
            peaks.join()
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            runs.append({"round": round_, "checkout": label, "wall_s": round(wall, 1), "load_before": round(load, 2),
                         "task_peak_anon_bytes": sorted(peaks.peaks.values(), reverse=True)})  # fmt: skip
            print(f"{label}: {wall:.1f} s, task peaks {[round(p / 1e6) for p in runs[-1]['task_peak_anon_bytes']]} MB")
    shards = sorted(f for f in os.listdir(os.path.join(WORK, "out-after")) if f.startswith("model-"))
    same = all(
        filecmp.cmp(os.path.join(WORK, "out-before", f), os.path.join(WORK, "out-after", f), shallow=False)
        for f in shards
    )
    peak = {
        c: max(p for r in runs if r["checkout"] == c for p in r["task_peak_anon_bytes"]) for c in ("before", "after")
    }
    doc = {
        "command": "python bench/ray_task_memory.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "baseline": args.baseline,
        "runs": runs,
        "outputs_byte_identical": same,
        "largest_task_peak_bytes": peak,
    }
    lines = [
        "# Ray task memory before and after the engine redesign",
        "",
        f"`{doc['command']}`, {doc['date']}; {os.cpu_count()} cores. Inputs: 0.5 B preset, 4 layers, 3 experts, "
        "TIES at model scope, `--shard-size 150MB`, `--ray local`; alternating, page cache dropped before each run.",
        "",
        "| round | checkout | wall | load before | largest task peak (anonymous) | every task's peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ps = r["task_peak_anon_bytes"]
        lines.append(f"| {r['round']} | {r['checkout']} ({args.baseline if r['checkout'] == 'before' else 'this'}) | "
                     f"{r['wall_s']} s | {r['load_before']} | {max(ps) / 1e6:.0f} MB | "
                     f"{', '.join(f'{p / 1e6:.0f}' for p in ps)} MB |")  # fmt: skip
    lines += ["", f"Largest task peak: before {peak['before'] / 1e6:.0f} MB, after {peak['after'] / 1e6:.0f} MB "
              f"({peak['after'] / peak['before']:.2f}×); outputs byte-identical: {same}."]  # fmt: skip
    write_results("ray-task-memory", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
