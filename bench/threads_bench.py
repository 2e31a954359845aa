#!/usr/bin/env python3
"""OrthoMerge wall and CPU time with 1 and 2 threads, on an idle machine and beside one busy
process (the load under which two BLAS threads once cost 5× the CPU of one), alternating:

    python bench/threads_bench.py [--repeats 2]

Inputs: one 0.5B-preset layer (hidden 1024, intermediate 4096), three bf16 experts with row
conflicts (tools/make_toy_models.py --shared 0.7), embeddings excluded from rotation. Writes
bench/results/threads.md and .json with the machine, load averages and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
WORK = os.path.join(ROOT, "bench", ".work", "threads")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402


def run(threads: int, busy: bool) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = os.path.join(WORK, "out")
        shutil.rmtree(out, ignore_errors=True)
        start = time.monotonic()
        experts = [a for i in (1, 2, 3) for a in ("--expert", os.path.join(WORK, "toys", f"expert-{i}"))]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streammerge.cli",
                "merge",
                "--quiet",
                "--device",
                "cpu",
                "--base",
                os.path.join(WORK, "toys", "base"),
                *experts,
                "--method",
                "orthomerge",
                "--exclude",
                "embed_tokens",
                "--exclude",
                "lm_head",
                "--threads",
                str(threads),
                "--out",
                out,
            ],
            cwd=ROOT,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this merge's own CPU time, not the busy process's
        wall = time.monotonic() - start
        if status != 0:
            raise SystemExit(f"merge failed ({status})")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    cpu = usage.ru_utime + usage.ru_stime
    return {"threads": threads, "busy": busy, "wall": wall, "cpu": cpu, "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(WORK, "toys", "expert-3")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "make_toy_models.py"),
                os.path.join(WORK, "toys"),
                "--preset",
                "0.5b",
                "--layers",
                "1",
                "--experts",
                "3",
                "--shared",
                "0.7",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    runs = []
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        for busy in (False, True):
            order = (1, 2) if rep % 2 == 0 else (2, 1)
            for threads in order:
                runs.append(run(threads, busy))
                print(runs[-1], flush=True)
    rows = []
    for busy in (False, True):
        for threads in (1, 2):
            sel = [r for r in runs if r["busy"] == busy and r["threads"] == threads]
            rows.append(
                {
                    "busy": busy,
                    "threads": threads,
                    "wall": statistics.median(r["wall"] for r in sel),
                    "cpu": statistics.median(r["cpu"] for r in sel),
                }
            )
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "command": "python bench/threads_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": runs,
        "medians": rows,
    }
    lines = [
        "# OrthoMerge with 1 and 2 CPU threads, idle and beside one busy process",
        "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}, load average before {load_before[0]:.2f}; one "
        "0.5B-preset layer, "
        "three experts, medians over the repeats; CPU is the merge process's own.",
        "",
        "| other load | threads | wall | CPU (user+sys) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'one busy process' if r['busy'] else 'none'} | {r['threads']} | {r['wall']:.1f} s | {r['cpu']:.1f} s |"
        )
    write_results("threads", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
