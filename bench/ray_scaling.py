#!/usr/bin/env python3
"""The same OrthoMerge merge locally and on a local Ray cluster of 1 and 2 one-CPU workers.

    python bench/ray_scaling.py                       # 1.5B shapes, 2 of its 28 layers, 3 experts
    python bench/ray_scaling.py --layers 28 --pairs 1 # the whole 1.5B model (hours on 2 cores)

Inputs: `tools/make_toy_models.py --preset 1.5b --layers L --experts 3 --shared 0.7` (bf16, experts
with conflicting rows, so OrthoMerge-C rotates). Every run merges with `--shard-size 150MB`
(about one layer per shard: the unit a Ray task takes) and OrthoMerge's defaults. Runs alternate
local / Ray×1 / Ray×2, `--pairs` rounds, page cache dropped before each. Local: `--threads 2` (this
machine's cores). Ray: a one-node cluster started with `ray start --head --num-cpus N` on this
machine (N one-CPU tasks at a time: N worker processes), stopped after each run; wall time includes the driver
joining it, not starting it. Recorded: wall time, the driver's peak RSS (`/usr/bin/time -v`), each Ray worker
process's peak anonymous RSS (sampled from /proc every 0.2 s), and whether the output equals the
local merge byte for byte. Results: bench/results/ray-scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import re
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import drop_caches, write_results  # noqa: E402

WORK = os.path.join(HERE, "work")
PORT = 6390
NODE = "localhost"  # Ray takes this machine's own address for it


def anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerPeaks(threading.Thread):
    """Peak anonymous RSS of every Ray worker process while it runs one of our tasks (its title:
    `ray::merge SHARD`, `ray::statistics SHARD`)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read(64)
                except OSError:
                    continue
                if cmd.startswith((b"ray::merge ", b"ray::statistics ")):  # our tasks, not Ray's agents
                    self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0), anon_rss(int(pid)))
            time.sleep(0.2)


def merge_cmd(models: str, out: str, extra: list[str]) -> list[str]:
    cmd = ["streammerge", "merge", "--quiet", "--device", "cpu", "--base", os.path.join(models, "base")]
    for i in (1, 2, 3):
        cmd += ["--expert", os.path.join(models, f"expert-{i}")]
    return cmd + ["--method", "orthomerge", "--out", out, "--shard-size", "150MB", *extra]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    # a cluster from `ray start` authenticates by token (~/.ray/auth_token); a driver sends it only when told
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=os.environ | env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return wall, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024


def ray_cluster(workers: int) -> None:
    """One Ray node on this machine offering `workers` CPUs: that many one-CPU tasks at a time."""
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    subprocess.run(
        [
            "ray",
            "start",
            "--head",
            "--num-cpus",
            str(workers),
            "--port",
            str(PORT),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1, help="rounds of (local, Ray×1, Ray×2)")
    args = ap.parse_args()
    models = os.path.join(WORK, f"1.5b-L{args.layers}-shared0.7")
    if not os.path.exists(os.path.join(models, "expert-3", "model.safetensors.index.json")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "make_toy_models.py"),
                models,
                "--preset",
                "1.5b",
                "--layers",
                str(args.layers),
                "--experts",
                "3",
                "--shard-size",
                "1GB",
                "--shared",
                "0.7",
            ],
            check=True,
        )
    runs = []
    reference = os.path.join(WORK, "ray-scaling-local")
    for round_ in range(args.pairs):
        for workers in (0, 1, 2):
            label = "local" if workers == 0 else f"ray x{workers}"
            out = os.path.join(WORK, f"ray-scaling-{workers}")
            if workers == 0:
                out = reference
            subprocess.run(["rm", "-rf", out])
            if workers:
                ray_cluster(workers)
            drop_caches()
            load = os.getloadavg()[0]
            peaks = WorkerPeaks()
            peaks.start()
            extra = ["--threads", "2"] if workers == 0 else ["--ray", f"{NODE}:{PORT}", "--threads", "1"]
            wall, driver_rss = timed(merge_cmd(models, out, extra), {"RAY_AUTH_MODE": "token"} if workers else {})
            peaks.stopped.set()
            peaks.join()
            if workers:
                subprocess.run(["ray", "stop", "--force"], capture_output=True)
            same = None
            if workers:
                files = sorted(f for f in os.listdir(reference) if f.endswith(".safetensors"))
                same = all(filecmp.cmp(os.path.join(reference, f), os.path.join(out, f), shallow=False) for f in files)
            run = {
                "round": round_,
                "run": label,
                "workers": workers,
                "wall_s": round(wall, 1),
                "driver_peak_rss_MB": round(driver_rss / 1e6),
                "worker_peak_anon_MB": sorted(round(v / 1e6) for v in peaks.peaks.values()),
                "load_1min_before": round(load, 2),
                "byte_identical_to_local": same,
            }
            runs.append(run)
            print(run, flush=True)
    table = [
        "| run | wall (median) | × local | driver peak RSS | worker processes' peak anonymous RSS | byte-identical to "
        "local |",
        "|---|---|---|---|---|---|",
    ]
    local = statistics.median(r["wall_s"] for r in runs if r["workers"] == 0)
    for label in ("local", "ray x1", "ray x2"):
        rs = [r for r in runs if r["run"] == label]
        wall = statistics.median(r["wall_s"] for r in rs)
        workers = max((max(r["worker_peak_anon_MB"], default=0) for r in rs), default=0)
        same = "—" if rs[0]["workers"] == 0 else ("yes" if all(r["byte_identical_to_local"] for r in rs) else "NO")
        table.append(
            f"| {label} | {wall:.1f} s | {wall / local:.2f} | {max(r['driver_peak_rss_MB'] for r in rs)} MB | "
            f"{'—' if not rs[0]['workers'] else f'≤ {workers} MB'} | {same} |"
        )
    loads = [r["load_1min_before"] for r in runs]
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/ray_scaling.py " + " ".join(sys.argv[1:]),
        "models": f"python tools/make_toy_models.py {models} --preset 1.5b --layers {args.layers} --experts 3 "
        "--shard-size 1GB --shared 0.7",
        "cores": os.cpu_count(),
        "load_1min_range": [min(loads), max(loads)],
        "runs": runs,
    }
    write_results(
        "ray-scaling",
        doc,
        [
            f"# OrthoMerge-C, locally and on a local Ray cluster ({doc['date']})",
            "",
            f"`{doc['command']}` on this {doc['cores']}-core machine; inputs `{doc['models']}`; load average before "
            "the runs "
            f"{min(loads)}–{max(loads)}. Local: `--threads 2`; Ray: one node offering N CPUs, `--threads 1` per task.",
            "",
            *table,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
