#!/usr/bin/env python3
"""The command's allocator settings (streammerge/allocator.py) against the defaults, side by side
on the same merge from this checkout, alternating, warm (inputs in the page cache) then cold (page
cache dropped before each run): wall, user and system seconds, minor page faults and peak RSS of
each run; outputs compared byte for byte.

    python bench/allocator_ab.py [--recipe bench/.work/0.5b-ta.yaml] [--pairs 3] [--setting glibc|thp]

`--setting glibc` (the default): glibc's thresholds as the command sets them, against glibc's own;
`--setting thp`: torch asking for transparent huge pages (THP_MEM_ALLOC_ENABLE, set by the
command), against THP_MEM_ALLOC_ENABLE=0. Both sides run the command's entry point (console.py).

Results: bench/results/allocator-ab-TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches, provenance, provenance_line, write_results  # noqa: E402
from fused_ab import digest, inputs  # noqa: E402

TITLES = {
    "glibc": "glibc thresholds set by the command against glibc's defaults",
    "thp": "torch asking for transparent huge pages (the command's setting) against THP_MEM_ALLOC_ENABLE=0",
}
ENTRY = "from streammerge.console import entry; entry()"
SIDES = {  # (code, environment) of each side; the other side leaves the setting as it was
    "glibc": {
        "tuned": (ENTRY, {}),
        "default": ("from streammerge import cli; cli.keep_blocks_on_the_heap = lambda: False; " + ENTRY, {}),
    },
    "thp": {"tuned": (ENTRY, {}), "default": (ENTRY, {"THP_MEM_ALLOC_ENABLE": "0"})},
}


def run(side: tuple[str, dict], recipe: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code, env = side
    cmd = [sys.executable, "-c", code, "merge", "--recipe", recipe, "--out", out, "--device", "cpu", "--quiet"]
    # RUSAGE_CHILDREN's peak RSS is the largest child's so far, so each merge runs under a probe
    # process of its own that reports the figures of its one child
    probe = (
        "import resource, subprocess, sys, json\n"
        "subprocess.run(sys.argv[1:], check=True, cwd=%r)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps([u.ru_utime, u.ru_stime, u.ru_minflt, u.ru_maxrss]))\n" % ROOT
    )
    start = time.perf_counter()
    printed = subprocess.run(
        [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, env=os.environ | env
    ).stdout
    wall = time.perf_counter() - start
    user, system, faults, maxrss_kb = json.loads(printed.strip().splitlines()[-1])
    return {"wall": wall, "user": user, "system": system, "minor_faults": faults, "peak_rss": maxrss_kb * 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "bench", ".work", "0.5b-ta.yaml"))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tag", default="ta-0.5b")
    ap.add_argument("--setting", choices=sorted(SIDES), default="glibc")
    args = ap.parse_args()
    files = inputs(args.recipe)
    work = tempfile.mkdtemp(prefix="allocator-ab-")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    digests = {}
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    for cache in ("warm", "cold"):
        for pair in range(args.pairs):
            for side in ("tuned", "default") if pair % 2 == 0 else ("default", "tuned"):
                if cache == "cold":
                    drop_caches()
                out = os.path.join(work, side)
                runs.setdefault(f"{cache} {side}", []).append(run(SIDES[args.setting][side], args.recipe, out))
                digests[side] = digest(out)
    shutil.rmtree(work, ignore_errors=True)
    doc = provenance("allocator_ab.py", load_before) | {
        "setting": args.setting,
        "sides": SIDES[args.setting],
        "runs": runs,
        "outputs_identical": digests["tuned"] == digests["default"],
    }
    lines = [
        f"# {TITLES[args.setting]}: {args.tag}",
        "",
        f"{provenance_line(doc)}; outputs byte-identical: {doc['outputs_identical']}.",
        "",
        "| run | wall (s) | user (s) | system (s) | minor faults | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {key} {i + 1} | {r['wall']:.2f} | {r['user']:.2f} | {r['system']:.2f} | {r['minor_faults']:,} "
            f"| {r['peak_rss'] / 1e6:.0f} |"
            for key, rs in runs.items()
            for i, r in enumerate(rs)
        ],
    ]
    write_results(f"allocator-ab-{args.tag}", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
