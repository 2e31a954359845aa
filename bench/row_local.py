#!/usr/bin/env python3
"""Every row-local method's throughput with its inputs in the page cache (issue #27's warm target):
GB/s of input of each merge, beside `cat` of the same files and a plain numpy float32 sum of the
same arrays (one pass at memory speed), all measured in this run on this machine.

    python bench/row_local.py [--repeats 2] [--methods linear task_arithmetic ...] [--tag 0.5b]

The inputs are the 0.5 B preset of bench/vs_mergekit.py (a bf16 base and three experts,
tools/make_toy_models.py --shared 0.7, made under bench/.work/0.5b if absent); each method gets a
mergekit recipe (bench/vs_mergekit.py's: weight 1 per model; density 0.5 where the method
sparsifies; slerp and nearswap take the base and the first expert). Each merge runs `--repeats`
times, methods interleaved, after one untimed merge of each (numba compiles a changed kernel
then); the table gives the median.
Results: bench/results/row-local-TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, provenance_line, write_results  # noqa: E402
from fused_ab import inputs, numpy_sum, run  # noqa: E402
from vs_mergekit import recipe  # noqa: E402  (the same YAML as the side-by-side with mergekit)

METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "slerp",
    "nearswap",
)


def merge(recipe_path: str, out: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one merge, with the kernels (fused_ab's run)."""
    return run(recipe_path, out, True, [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", ".work"))
    ap.add_argument("--tag", default="0.5b")
    args = ap.parse_args()
    data = os.path.join(args.work, "0.5b")
    if not os.path.exists(os.path.join(data, "expert-3")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "make_toy_models.py"), data, "--preset", "0.5b"]
            + ["--experts", "3", "--shared", "0.7", "--shard-size", "2GB"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    base, experts = os.path.join(data, "base"), [os.path.join(data, f"expert-{i}") for i in (1, 2, 3)]
    recipes, files = {}, {}
    for method in args.methods:
        recipes[method] = os.path.join(args.work, f"row-local-{method}.yaml")
        with open(recipes[method], "w") as f:
            f.write(recipe(method, base, experts, 0.5))
        files[method] = inputs(recipes[method])
    work = tempfile.mkdtemp(prefix="row-local-")
    load_before = os.getloadavg()
    everything = sorted({f for fs in files.values() for f in fs})
    subprocess.run(["cat", *everything], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    for method in args.methods:  # untimed: compiles a changed kernel once
        merge(recipes[method], os.path.join(work, "out"))
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods if repeat % 2 == 0 else reversed(args.methods):
            runs[method].append(merge(recipes[method], os.path.join(work, "out")))
    floors: dict[str, dict[str, float]] = {}
    for method in args.methods:
        key = " ".join(os.path.basename(os.path.dirname(f)) for f in files[method])
        if key not in floors:
            start = time.perf_counter()
            subprocess.run(["cat", *files[method]], stdout=subprocess.DEVNULL, check=True)
            floors[key] = {"cat": time.perf_counter() - start, "numpy sum": numpy_sum(files[method])}
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for method in args.methods:
        key = " ".join(os.path.basename(os.path.dirname(f)) for f in files[method])
        size = sum(os.path.getsize(f) for f in files[method])
        walls = sorted(w for w, _ in runs[method])
        wall = walls[len(walls) // 2]
        rows.append(
            {
                "method": method,
                "inputs": key,
                "input_bytes": size,
                "runs": runs[method],
                "median_wall": wall,
                "cat": floors[key]["cat"],
                "numpy_sum": floors[key]["numpy sum"],
            }
        )
    doc = provenance("row_local.py", load_before) | {
        "recipes": {m: open(recipes[m]).read() for m in args.methods},
        "rows": rows,
    }
    lines = [
        f"# Row-local methods, inputs in the page cache: {args.tag}",
        "",
        f"{provenance_line(doc)}; the 0.5 B preset (bf16); each merge the median of {args.repeats} runs, "
        "CPU seconds (user + system) of the same runs.",
        "",
        "| method | inputs | GB | merge (s) | CPU (s) | GB/s | `cat` GB/s | numpy sum GB/s | merge / numpy sum |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['inputs']} | {r['input_bytes'] / 1e9:.2f} | {r['median_wall']:.2f} "
            f"| {sorted(c for _, c in r['runs'])[len(r['runs']) // 2]:.2f} "
            f"| {r['input_bytes'] / 1e9 / r['median_wall']:.2f} | {r['input_bytes'] / 1e9 / r['cat']:.2f} "
            f"| {r['input_bytes'] / 1e9 / r['numpy_sum']:.2f} | {r['median_wall'] / r['numpy_sum']:.2f} |"
            for r in rows
        ],
    ]
    write_results(f"row-local-{args.tag}", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
