#!/usr/bin/env python3
"""Merges run one after another, as a user runs them: the threads the second one takes by default
(streammerge/cpu.py: the cores the other processes leave, measured as the command starts) and its
wall time, beside the same merge with `--threads 1` and `--threads 2` given, alternating, inputs in
the page cache. The 1-minute load average still counts the merge before (about 1 on two cores),
which is what the threads were chosen by until round seven.

    python bench/back_to_back.py [--recipe bench/.work/0.5b-dare_ties.yaml] [--repeats 3]

Results: bench/results/back-to-back-TAG.{json,md} (TAG: the recipe's name).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command, provenance, provenance_line, write_results  # noqa: E402


def merge(recipe: str, out: str, threads: int | None) -> tuple[float, int]:
    """Wall seconds and the threads the merge reports it ran on."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(
        "merge", "--recipe", recipe, "--out", out, "--device", "cpu", *(["--threads", str(threads)] if threads else [])
    )
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = re.search(r"\((\d+) thread\(s\)\)", done.stdout + done.stderr)
    return wall, int(found.group(1)) if found else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "bench", ".work", "0.5b-dare_ties.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    recipe = os.path.abspath(args.recipe)
    work = tempfile.mkdtemp(prefix="back-to-back-")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"default": [], "--threads 1": [], "--threads 2": []}
    merge(recipe, os.path.join(work, "out"), None)  # inputs into the page cache, kernels compiled
    for _ in range(args.repeats):
        for side, threads in (("default", None), ("--threads 1", 1), ("--threads 2", 2)):
            load = os.getloadavg()[0]
            wall, used = merge(recipe, os.path.join(work, "out"), threads)
            runs[side].append({"wall": wall, "threads": used, "load_1min": load})
    shutil.rmtree(work, ignore_errors=True)
    tag = os.path.splitext(os.path.basename(recipe))[0]
    doc = provenance("back_to_back.py", load_before) | {"recipe_text": open(recipe).read(), "runs": runs}
    lines = [
        f"# Merges back to back: {tag}",
        "",
        f"{provenance_line(doc)}; each merge starts as the one before ends, inputs cached.",
        "",
        "| merge | 1-minute load as it starts | threads it ran on | wall (s) |",
        "|---|---|---|---|",
        *[
            f"| {side} | {r['load_1min']:.2f} | {r['threads']} | {r['wall']:.2f} |"
            for side, rs in runs.items()
            for r in rs
        ],
    ]
    write_results(f"back-to-back-{tag}", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
