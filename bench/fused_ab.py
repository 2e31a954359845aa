#!/usr/bin/env python3
"""The fused kernels (streammerge/math/fused.py, numba) against torch's code, side by side on the
same merge, alternating, page cache dropped before every run; outputs compared byte for byte.

    python bench/fused_ab.py [--recipe bench/.work/tie-order-0.5b.yaml] [--pairs 2] [--param K=V ...]
    python bench/fused_ab.py --recipe bench/.work/0.5b-ta.yaml --baseline COMMIT   # against a commit

With `--baseline COMMIT` the other side is that commit (a `git worktree` under bench/.work), with
the kernels too, in place of torch's code. Each pair also times `cat` of the inputs with the page
cache dropped (the cold read) and writing as many bytes as the merged output with an fsync (the
cold write): the floors a streaming merge can reach.

Also, warm (inputs in the page cache; `--cold-pairs 0`: these only): as many alternating pairs,
wall and CPU seconds, and each side's median throughput in GB/s of input, beside `cat` of the
same files and a plain numpy sum of the same arrays (the memory-bandwidth bound of one pass). One
untimed merge of each side comes first: a numba kernel changed since the last run compiles then
(once per install, cached on disk).
Results: bench/results/fused-ab-TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checkout, command, drop_caches, provenance, provenance_line, write_results  # noqa: E402


def digest(folder: str) -> str:
    h = hashlib.sha256()
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with open(os.path.join(folder, f), "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def inputs(recipe: str) -> list[str]:
    import yaml

    doc = yaml.safe_load(open(recipe))
    if "merge_method" in doc:  # mergekit's recipe
        folders = [*([doc["base_model"]] if doc.get("base_model") else []), *[m["model"] for m in doc["models"]]]
    else:  # ours
        folders = [doc["base"], *[e if isinstance(e, str) else e["path"] for e in doc["experts"]]]
    folders = list(dict.fromkeys(folders))  # mergekit's slerp lists the base among its models: read once
    return [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def numpy_sum(files: list[str]) -> float:
    """Seconds to read every tensor of the inputs from the page cache and sum it in float32 with
    numpy (bf16 widened to float32 by a shift of its bits, as a load into float32 must)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    start = time.perf_counter()
    for f in files:
        with safe_open(f, "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                if t.dtype == torch.bfloat16:
                    a = (t.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)
                else:
                    a = t.float().numpy()
                np.add.reduce(a, axis=None)
    return time.perf_counter() - start


def run(recipe: str, out: str, fused: bool, params: list[str], cwd: str = ROOT) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one merge, run from `cwd` (`python -c` imports the
    streammerge found there)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.pop("STREAMMERGE_NO_NUMBA", None)
    if not fused:
        env["STREAMMERGE_NO_NUMBA"] = "1"
    # the installed command's entry point (console.py), from the package found in `cwd`
    cmd = command("merge", "--recipe", recipe, "--out", out, "--device", "cpu", "--quiet", *params)
    start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=True, cwd=cwd)
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime


def cold_read(files: list[str]) -> float:
    """Seconds `cat` takes to read the files with the page cache dropped: the read floor."""
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def cold_write(folder: str, nbytes: int) -> float:
    """Seconds to write `nbytes` of incompressible bytes to a file in `folder` and fsync it: the
    disk's part of writing the merged output, the other floor a merge cannot go below."""
    block = os.urandom(1 << 24)
    path = os.path.join(folder, "write-floor")
    start = time.perf_counter()
    with open(path, "wb") as f:
        for done in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - done)])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "bench", ".work", "tie-order-0.5b.yaml"))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--cold-pairs", type=int, help="pairs with the page cache dropped (default: --pairs; 0: warm only)")
    ap.add_argument("--param", action="append", default=[], help="passed to merge as --param K=V")
    ap.add_argument("--threads", type=int, help="passed to merge as --threads N (default: each side chooses)")
    ap.add_argument("--tag", default="ties-0.5b")
    ap.add_argument("--baseline", help="a commit to run as the other side (with the kernels), in place of torch's code")
    args = ap.parse_args()
    args.recipe = os.path.abspath(args.recipe)  # the baseline runs from its own folder
    other = "baseline" if args.baseline else "torch"
    baseline = (
        checkout(args.baseline, os.path.join(ROOT, "bench", ".work", f"baseline-{args.baseline}"))
        if args.baseline
        else ROOT
    )

    def merge(side: str, out: str) -> tuple[float, float]:
        return run(args.recipe, out, side != "torch", params, baseline if side == "baseline" else ROOT)

    params = [x for p in args.param for x in ("--param", p)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    files = inputs(args.recipe)
    size = sum(os.path.getsize(f) for f in files)
    work = tempfile.mkdtemp(prefix="fused-ab-")
    load_before = os.getloadavg()
    cold: dict[str, list[float]] = {"fused": [], other: [], "cat": [], "write": []}
    cpu: dict[str, list[float]] = {"fused": [], other: []}  # user + system seconds of each cold run
    digests = {}
    for side in ("fused", other):  # untimed: a kernel changed since the last run compiles once here
        merge(side, os.path.join(work, side))
    for pair in range(args.pairs if args.cold_pairs is None else args.cold_pairs):
        cold["cat"].append(cold_read(files))
        for side in ("fused", other) if pair % 2 == 0 else (other, "fused"):
            drop_caches()
            out = os.path.join(work, side)
            wall, used = merge(side, out)
            cold[side].append(wall)
            cpu[side].append(used)
            digests[side] = digest(out)
        out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        drop_caches()
        cold["write"].append(cold_write(work, out_bytes))
    warm: dict[str, float] = {}
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    warm["cat"] = time.perf_counter() - start
    warm["numpy sum"] = numpy_sum(files)
    warm_runs: dict[str, list[tuple[float, float]]] = {"fused": [], other: []}  # (wall, CPU) alternating
    for pair in range(args.pairs):
        for side in ("fused", other) if pair % 2 == 0 else (other, "fused"):
            warm_runs[side].append(merge(side, os.path.join(work, side)))
            if side not in digests:  # no cold pairs: the first warm outputs are compared
                digests[side] = digest(os.path.join(work, side))
    for side in ("fused", other):
        warm[side] = sorted(w for w, _ in warm_runs[side])[len(warm_runs[side]) // 2]  # the median
    shutil.rmtree(work, ignore_errors=True)
    doc = provenance("fused_ab.py", load_before) | {
        "recipe_text": open(args.recipe).read(),  # bench/.work is not kept: the recipe itself, to remake it
        "merge_arguments": params,
        "input_bytes": size,
        "cold_seconds": cold,
        "cold_cpu_seconds": cpu,
        "warm_seconds": warm,
        "warm_runs": warm_runs,
        "other_side": f"commit {args.baseline}" if args.baseline else "torch's code (STREAMMERGE_NO_NUMBA=1)",
        "outputs_identical": digests["fused"] == digests[other],
    }
    if cold["cat"]:
        doc["ratio_cold_median"] = sorted(f / t for f, t in zip(cold["fused"], cold[other]))[len(cold["fused"]) // 2]
        doc["cold_read_ratio_median"] = sorted(f / c for f, c in zip(cold["fused"], cold["cat"]))[len(cold["cat"]) // 2]
    gb = size / 1e9
    lines = [
        f"# This checkout (fused kernels) against {doc['other_side']}: {args.tag}",
        "",
        f"{provenance_line(doc)}; inputs {gb:.2f} GB; outputs byte-identical: {doc['outputs_identical']}"
        f"; merge arguments beyond the recipe: {' '.join(params) or 'none'}.",
        "",
        f"| page cache dropped | cold read, `cat` (s) | write + fsync of the output's size (s) | fused (s) "
        f"| {other} (s) | fused / {other} | fused / cold read | fused / (read + write) | CPU s, fused / {other} |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| pair {i + 1} | {c:.1f} | {w:.1f} | {f:.1f} | {t:.1f} | {f / t:.2f} | {f / c:.1f} | {f / (c + w):.1f} "
            f"| {cf:.1f} / {ct:.1f} |"
            for i, (c, w, f, t, cf, ct) in enumerate(
                zip(cold["cat"], cold["write"], cold["fused"], cold[other], cpu["fused"], cpu[other])
            )
        ],
        "",
        f"| inputs cached | fused (s) | {other} (s) | fused / {other} | CPU s, fused / {other} |",
        "|---|---|---|---|---|",
        *[
            f"| pair {i + 1} | {f[0]:.2f} | {t[0]:.2f} | {f[0] / t[0]:.2f} | {f[1]:.2f} / {t[1]:.2f} |"
            for i, (f, t) in enumerate(zip(warm_runs["fused"], warm_runs[other]))
        ],
        "",
        "| warm (inputs cached; merges: the median) | seconds | GB/s of input |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {gb / v:.2f} |" for k, v in warm.items()],
    ]
    write_results(f"fused-ab-{args.tag}", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
