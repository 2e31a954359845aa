#!/usr/bin/env python3
"""When a cold merge reads: the bytes it has read from the disk, sampled every 0.05 s.

    python bench/read_timeline.py --recipe bench/.work/row-local-task_arithmetic.yaml --tag ta-0.5b

Drops the page cache (when permitted), imports what a merge imports (so that only the inputs are
read from the disk), runs `streammerge merge` (quiet, on the CPU) and samples its /proc/PID/io
`read_bytes` (bytes the disk delivered to the process) and its CPU seconds, so that the wall time
splits into: before the first read (starting Python, importing torch, planning), reading (from the
first 64 MiB read to all but the last), the gaps where reads stopped for 0.2 s or more, and after
the last read (writing out). Runs `--runs` times; writes bench/results/read-timeline-TAG.md and
.json with the `cat` of the same inputs, cold, before each run, for the floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command, drop_caches, provenance, provenance_line, write_results  # noqa: E402
from fused_ab import cold_read, inputs  # noqa: E402

STEP = 0.05
GAP = 0.2  # seconds without a read counted as a stop
EDGE = 64 << 20


def _read_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


# what a merge imports, read back into the page cache after it is dropped: the timeline is of the
# inputs' reads (as `cat`'s floor is), not of loading torch's libraries from the disk
WARM_IMPORTS = "import numpy, torch, safetensors, streammerge.engine.run\ntry: import numba\nexcept ImportError: pass"


def timeline(recipe: str, out: str, cwd: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], cwd=cwd, check=True)
    cmd = command("merge", "--recipe", recipe, "--out", out, "--device", "cpu", "--quiet")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd)
    samples = []  # (seconds since start, read_bytes, cpu seconds)
    while proc.poll() is None:
        got, cpu = _read_bytes(proc.pid), _cpu_seconds(proc.pid)
        if got is not None and cpu is not None:
            samples.append((time.perf_counter() - start, got, cpu))
        time.sleep(STEP)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"merge failed ({proc.returncode})")
    total = samples[-1][1]
    reading = [s for s in samples if 0 < s[1]]
    # the inputs' reads: from the first 64 MiB (Python's own start reads a few MB) to all but the last
    first = next(t for t, b, _ in samples if b > EDGE)
    last = next(t for t, b, _ in samples if b >= total - EDGE)
    gaps: list[list[float]] = []  # intervals in which the disk delivered under 1 MiB per sample
    for (t0, b0, _), (t1, b1, _) in zip(samples, samples[1:]):
        if t0 < first or t1 > last or b1 - b0 >= (1 << 20):
            continue
        if gaps and gaps[-1][1] == round(t0, 2):
            gaps[-1][1] = round(t1, 2)
        else:
            gaps.append([round(t0, 2), round(t1, 2)])
    gaps = [g for g in gaps if g[1] - g[0] >= GAP]
    return {
        "wall": round(wall, 3),
        "first_read": round(first, 2),
        "last_read": round(last, 2),
        "read_gb": round(total / 1e9, 3),
        "gaps": gaps,
        "gap_seconds": round(sum(b - a for a, b in gaps), 2),
        "cpu_at_first_read": round(next(c for t, b, c in reading if b > EDGE), 2),
        "samples": len(samples),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--code", default=ROOT, help="the checkout whose streammerge runs (its folder is the cwd)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", ".work", "timeline-out"))
    args = ap.parse_args()
    if not drop_caches():
        raise SystemExit("needs to drop the page cache (root): a warm timeline shows no reads")
    load = os.getloadavg()
    files = inputs(args.recipe)
    runs = []
    for _ in range(args.runs):
        cat = cold_read(files)
        row = timeline(args.recipe, args.out, os.path.abspath(args.code))
        row["cat"] = round(cat, 3)
        row["load"] = round(os.getloadavg()[0], 2)
        runs.append(row)
        print(row, flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    doc = provenance("read_timeline.py", load)
    doc.update(recipe=args.recipe, code=os.path.abspath(args.code), runs=runs)
    lines = [
        f"# When a cold merge reads: {args.tag}",
        "",
        provenance_line(doc),
        "",
        "| run | wall s | cold cat s | wall / cat | first read s | last read s | stops (>= 0.2 s) | CPU s at first "
        "read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        stops = ", ".join(f"{a}-{b}" for a, b in r["gaps"]) or "none"
        lines.append(f"| {i} | {r['wall']} | {r['cat']} | {r['wall'] / r['cat']:.2f} | {r['first_read']} | "
                     f"{r['last_read']} | {stops} | {r['cpu_at_first_read']} |")  # fmt: skip
    write_results(f"read-timeline-{args.tag}", doc, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
