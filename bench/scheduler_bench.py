#!/usr/bin/env python3
"""Merge synthetic experts at given sizes and methods; record what the scheduler achieved.

    python bench/scheduler_bench.py --sizes 0.5b 1.5b --methods task_arithmetic ties orthomerge
    python bench/scheduler_bench.py --sizes 8b-slice --experts 5 --methods task_arithmetic ties dare_ties
    python bench/scheduler_bench.py --sizes 8b-slice --experts 5 --methods orthomerge --tag embedding \
        --merge-args "--exclude ^model.layers. --exclude ^lm_head --max-ram 12GB"

For each (size, method): drops the page cache (when permitted), measures the raw sequential
read throughput of the same input files, drops the cache again, then runs
`streammerge merge` under /usr/bin/time -v with --memory-report, and records wall time,
bytes read (planned), read-ahead throughput, raw read throughput, peak anonymous RSS
(sampled) and peak RSS (time -v), the planner's estimate, and the machine. Results go to
bench/results/scheduler-SIZE-METHOD[-TAG].json and a line in bench/results/scheduler.md;
`--merge-args` go to every merge (a budget, OrthoMerge's `--exclude` to time one tensor kind).
orthomerge runs with its defaults: conflict target, residuals by TA with λ = 1/N. The experts
share a per-row direction with random signs (`--shared`, default 0.7), so each is in the
minority — conflicting with the mean update — on about a quarter of the rows of every matrix.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches  # noqa: E402

WORK = os.path.join(ROOT, "bench", "work")
RESULTS = os.path.join(ROOT, "bench", "results")


def inputs(folder: str, n: int = 3) -> list[str]:
    out = []
    for d in ["base"] + [f"expert-{i}" for i in range(1, n + 1)]:
        out += sorted(
            os.path.join(folder, d, f) for f in os.listdir(os.path.join(folder, d)) if f.endswith(".safetensors")
        )
    return out


def raw_read(files: list[str]) -> tuple[int, float]:
    buf = bytearray(16 * 1024 * 1024)
    total, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - start


def machine() -> str:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu or platform.machine()}), {mem:.0f} GiB RAM, {versions}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "orthomerge"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument(
        "--shared",
        type=float,
        default=0.7,
        help="experts' shared, sign-flipped direction (make_toy_models --shared): gives OrthoMerge-C conflicting rows",
    )
    ap.add_argument("--merge-args", default="", help="more `streammerge merge` flags, one string (shell words)")
    ap.add_argument("--tag", help="suffix of the result file's name, for runs with --merge-args")
    args = ap.parse_args()
    extra = shlex.split(args.merge_args)
    os.makedirs(RESULTS, exist_ok=True)
    for size in args.sizes:
        n = args.experts
        folder = os.path.join(WORK, f"{size}-shared{args.shared}" + (f"-x{n}" if n != 3 else ""))
        if not os.path.exists(os.path.join(folder, f"expert-{n}", "model.safetensors.index.json")):
            subprocess.run(
                [
                    sys.executable,
                    os.path.join(ROOT, "tools", "make_toy_models.py"),
                    folder,
                    "--preset",
                    size,
                    "--experts",
                    str(n),
                    "--shard-size",
                    "1GB",
                    "--shared",
                    str(args.shared),
                ],
                check=True,
            )
        files = inputs(folder, n)
        for method in args.methods:
            out = os.path.join(WORK, f"out-{size}-{method}")
            subprocess.run(["rm", "-rf", out])
            dropped = drop_caches()
            nbytes, seconds = raw_read(files)
            drop_caches()
            report = out + "-memory.json"
            cmd = ["streammerge", "merge", "--quiet", "--device", args.device, "--base", os.path.join(folder, "base")]
            for i in range(1, n + 1):
                cmd += ["--expert", os.path.join(folder, f"expert-{i}")]
            cmd += ["--method", method, *extra, "--out", out, "--memory-report", report]
            timed = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
            if timed.returncode != 0:
                print(timed.stderr[-2000:], file=sys.stderr)
                return timed.returncode
            mem = json.load(open(report))
            rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timed.stderr).group(1))
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", timed.stderr).group(1)
            record = {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(),
                "size": size,
                "method": method,
                "command": shlex.join(cmd),
                "load_average_before": os.getloadavg(),
                "models": f"python tools/make_toy_models.py {folder} --preset {size} --experts {n} --shard-size 1GB "
                f"--shared {args.shared}",
                "page_cache_dropped": dropped,
                "input_bytes": nbytes,
                "raw_sequential_read_MBps": round(nbytes / seconds / 1e6, 1),
                "wall_time": wall,
                "merge_seconds": round(mem["seconds"], 1),
                "bytes_read_ahead": mem["bytes_read_ahead"],
                # None where the read-ahead asks the kernel to read (prefetch.py): no rate of its own
                "read_ahead_MBps": round(mem["read_throughput"] / 1e6, 1) if mem["read_throughput"] else None,
                "input_MBps_over_merge": round(mem["bytes_read_ahead"] / mem["seconds"] / 1e6, 1),
                "bytes_written": mem["bytes_written"],
                "peak_anon_rss_MB": round(mem["measured_peak_ram"] / 1e6, 1),
                "planned_peak_MB": round(mem["planned_peak_ram"] / 1e6, 1),
                "peak_rss_time_v_MB": round(rss_kb * 1024 / 1e6, 1),
            }
            name = f"{method}-{args.tag}" if args.tag else method
            with open(os.path.join(RESULTS, f"scheduler-{size}-{name}.json"), "w") as f:
                json.dump(record, f, indent=2)
            line = (
                f"| {size} | {name} | {record['merge_seconds']} s | {nbytes / 1e9:.2f} GB | "
                f"{record['input_MBps_over_merge']} MB/s | "
                f"{record['read_ahead_MBps']} MB/s | {record['raw_sequential_read_MBps']} MB/s | "
                f"{record['peak_anon_rss_MB']} MB | "
                f"{record['planned_peak_MB']} MB | {record['peak_rss_time_v_MB']} MB |"
            )
            with open(os.path.join(RESULTS, "scheduler.md"), "a") as f:
                f.write(line + "\n")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
