#!/usr/bin/env python3
"""Where a merge's time goes: `streammerge merge` under py-spy, summarised per thread and function.

    python bench/profile_merge.py --recipe bench/.work/0.5b-task_arithmetic.yaml --tag ta-0.5b
    python bench/profile_merge.py --tag om-c -- --base B --expert E1 --expert E2 --method orthomerge

Drops the page cache first (when permitted; `--warm`: reads the inputs into it instead), samples
the merge's Python stacks with py-spy (`--rate` per second, idle samples included, so a thread
waiting shows as waiting), and writes
bench/results/profile-TAG.md: the wall time, each thread's share of the samples with its busiest
lines, and the functions with most time spent inside them (inclusive) on the compute thread.
A sample is attributed to the innermost streammerge line on its stack (torch's work shows as the
line that called it; a factorisation as the line that called its wrapper in math/lapack.py or
math/robust.py), or to the innermost frame when the stack has no streammerge line. The stacks are
kept in bench/.work/profile-TAG.json; `--again` summarises them again without running.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches  # noqa: E402
from fused_ab import inputs  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def parse(raw: str) -> list[tuple[str, list[tuple[str, str, int]], int]]:
    """py-spy's raw (collapsed) output → [(thread, [(function, file, line), outermost first], samples)]."""
    stacks = []
    for row in raw.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread, frames = parts[0], []
        for part in parts[1:]:
            m = FRAME.match(part)
            frames.append((m["func"], m["file"], int(m["line"])) if m else (part, "", 0))
        stacks.append((thread, frames, int(count)))
    return stacks


def ours(file: str) -> bool:
    """A frame of this package (py-spy gives its paths relative, `streammerge/...`)."""
    return file.startswith("streammerge/") or "/streammerge/" in file


def short(frame: tuple[str, str, int]) -> str:
    func, file, line = frame
    if not file:
        return func
    rel = file.split("streammerge/", 1)[-1] if ours(file) else os.path.basename(file)
    return f"{func} ({rel}:{line})"


def attributed(frames: list[tuple[str, str, int]]) -> tuple[str, str, int]:
    # math/lapack.py and math/robust.py only wrap a factorisation: their caller's line says which one
    mine = [f for f in frames if ours(f[1]) and not f[1].endswith(("math/lapack.py", "math/robust.py"))]
    return mine[-1] if mine else (frames[-1] if frames else ("(empty)", "", 0))


def thread_label(thread: str) -> str:
    """py-spy names a thread `thread (ID): NAME`; threads of one name (a shard writer per tensor)
    are counted together, and the main thread's samples from before it was named go with it."""
    name = thread.partition("): ")[2].strip()
    return name or "MainThread"


def ranked(counts) -> list[tuple[str, int]]:
    """Most samples first; equal counts by name, so that --again rewrites the same table."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def summarise(stacks, top: int) -> list[str]:
    per_thread = collections.Counter()
    lines_of = collections.defaultdict(collections.Counter)
    inclusive = collections.defaultdict(collections.Counter)
    for thread, frames, n in stacks:
        label = thread_label(thread)
        per_thread[label] += n
        lines_of[label][short(attributed(frames))] += n
        for f in {(func, file) for func, file, _ in frames if ours(file)}:
            inclusive[label][f"{f[0]} ({f[1].split('streammerge/', 1)[-1]})"] += n
    total = sum(per_thread.values()) or 1
    out = []
    for label, n in ranked(per_thread):
        if n < 0.01 * total:
            continue
        out += [
            "",
            f"### thread {label}: {n} samples ({100 * n / total:.0f} % of all)",
            "",
            "| line (innermost streammerge frame) | share of this thread |",
            "|---|---|",
        ]
        out += [f"| `{line}` | {100 * k / n:.1f} % |" for line, k in ranked(lines_of[label])[:top]]
        if inclusive[label]:
            out += ["", "| function (inclusive) | share of this thread |", "|---|---|"]
            # the engine's frames that every sample passes through say nothing
            out += [
                f"| `{f}` | {100 * k / n:.1f} % |"
                for f, k in [(f, k) for f, k in ranked(inclusive[label]) if k < 0.95 * n][:top]
            ]
    return out


def cache_state(run: dict) -> str:
    if run.get("warm"):
        return "warm (the inputs read twice before)"
    return "dropped" if run["cache_dropped"] else "not dropped (not permitted)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="a recipe (ours or mergekit's) for streammerge merge --recipe")
    ap.add_argument("--tag", required=True, help="results go to bench/results/profile-TAG.md")
    ap.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")
    ap.add_argument("--top", type=int, default=12, help="rows per table (default 12)")
    ap.add_argument("--threads", type=int, help="pass --threads N to the merge")
    ap.add_argument("--device", default="cpu", help="the merge's --device (default cpu)")
    ap.add_argument(
        "--warm",
        action="store_true",
        help="read the recipe's inputs into the page cache first instead of dropping it (needs --recipe)",
    )
    ap.add_argument(
        "--again",
        action="store_true",
        help="summarise the stacks the last run with this tag kept (bench/.work), run nothing",
    )
    ap.add_argument("merge_args", nargs="*", help="more arguments for streammerge merge (after --)")
    args = ap.parse_args()
    kept = os.path.join(ROOT, "bench", ".work", f"profile-{args.tag}.json")
    if args.again:
        run = json.load(open(kept))
    else:
        pyspy = shutil.which("py-spy") or sys.exit("py-spy is not installed (pip install py-spy)")
        # the installed command, else this checkout's package (a machine without pip, say)
        streammerge = shutil.which("streammerge")
        launch = [streammerge] if streammerge else [sys.executable, "-m", "streammerge.cli"]
        if not streammerge:
            os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        out = tempfile.mkdtemp(prefix="profile-")
        raw = os.path.join(out, "stacks.txt")
        merge = [
            *launch,
            "merge",
            *(["--recipe", args.recipe] if args.recipe else []),
            *args.merge_args,
            "--out",
            os.path.join(out, "merged"),
            "--device",
            args.device,
            "--quiet",
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        if args.warm:
            if not args.recipe:
                sys.exit("--warm needs --recipe (the inputs to read first)")
            for _ in range(2):  # twice: the first read may leave pages the second then finds
                subprocess.run(["cat", *inputs(args.recipe)], stdout=subprocess.DEVNULL, check=True)
        cache_dropped = False if args.warm else drop_caches()
        load = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(
            [
                pyspy,
                "record",
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--idle",
                "--threads",
                "--nonblocking",
                "--output",
                raw,
                "--",
                *merge,
            ],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        failed = proc.returncode != 0 or not os.path.isdir(os.path.join(out, "merged"))  # py-spy's 0 hides it
        if failed:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode or 1
        run = {
            "stacks": open(raw).read(),
            "merge": merge[len(launch) :],
            "wall": wall,
            "load": load[0],
            "cache_dropped": cache_dropped,
            "warm": args.warm,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "argv": sys.argv[1:],
            "rate": args.rate,
        }
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        with open(kept, "w") as f:
            json.dump(run, f)
    stacks = parse(run["stacks"])
    merge, wall, load, cache_dropped = run["merge"], run["wall"], run["load"], run["cache_dropped"]
    command = "python bench/profile_merge.py " + " ".join(shlex.quote(a) for a in run["argv"])
    # the output went to a temporary folder, removed after the run: show where, not its name
    merge = [
        "TMP/merged" if a.endswith("/merged") and os.path.basename(os.path.dirname(a)).startswith("profile-") else a
        for a in merge
    ]
    doc = [
        f"# Profile: {args.tag}",
        "",
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{run['date']}; load average before {load:.2f}; "
        f"page cache {cache_state(run)}; wall time under py-spy "
        f"{wall:.1f} s (sampling at {run['rate']}/s, non-blocking, adds little). Merge: "
        f"`{' '.join(shlex.quote(a) for a in merge)}`.",
        "",
        "Idle samples are included: a thread's share is wall time, waiting included "
        "(`wait`/`acquire` lines are a thread blocked on another).",
    ]
    doc += summarise(stacks, args.top)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"profile-{args.tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(doc) + "\n")
    print(f"wall {wall:.1f} s; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
