#!/usr/bin/env python3
"""The memory plan of every method at Llama-3.1-8B and -70B shapes (header-only inputs).

    python bench/plan_laptop.py [--out bench/results/plan-8b-70b.md]

Makes five header-only experts + base per shape (tools/make_shape_fixture.py, sparse files)
and plans each method (a) CPU-only and (b) with a 24 GB GPU (`--assume-gpu 24GB
--max-gpu-memory 22GB`), reporting the peak RAM (anonymous memory: process + largest working
set) and peak GPU memory the planner computes, and which tensor sets each peak. Budgets are
set generously here so that every plan is reported; tests/test_plan_8b.py holds 8B to 12 GB.
Planned for one thread: the smallest peaks (with two threads or more and the room, OrthoMerge also
counts a second Procrustes solve side by side, Need.side_by_side: +3.5 GB at an 8B `down_proj`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_shape_fixture  # noqa: E402

from streammerge import Expert, Recipe  # noqa: E402
from streammerge.engine import Merge, RunOptions  # noqa: E402

CASES = [
    ("task_arithmetic", {}),
    ("linear", {}),
    ("ties", {}),
    ("ties", {"scope": "model"}),
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("orthomerge", {"target": "global"}),
    ("orthomerge", {"target": "conflict"}),
    ("orthomerge", {"target": "global", "residual_method": "ties"}),
    ("orthomerge", {"target": "conflict", "residual_method": "ties"}),
    ("orthomerge", {"target": "conflict", "precision": "float64"}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("ortho_svd", {}),
    ("do_merging", {}),
    ("karcher", {}),
    ("model_stock", {}),
    ("sce", {}),
]


def plan(root: str, method: str, params: dict, gpu: bool):
    experts = tuple(Expert(os.path.join(root, f"expert-{i}")) for i in range(1, 6))
    recipe = Recipe(method, os.path.join(root, "base"), experts, os.path.join(root, "out"), dict(params))
    kw = {"max_ram": 10**13, "threads": 1}
    if gpu:
        kw |= {"assume_gpu": 24 * 10**9, "max_gpu_memory": 22 * 10**9}
    m = Merge(recipe, RunOptions(device="cpu", quiet=True, **kw))
    try:
        return m.plan
    finally:
        m.close()


def conflict_working_sets() -> list[str]:
    """OrthoMerge-C's working set for one 70B `down_proj` of five experts once its conflicting rows
    are counted (what `plan` does when the upper bound does not fit): orthomerge.memory given
    the counts, for LoRA-like and dense experts with a share of rows conflicting."""
    from streammerge.methods import orthomerge

    shape, n, params = (8192, 28672), 5, orthomerge.OrthoMergeParams(target="conflict")
    cases = [
        ("upper bound (no counts)", None),
        ("LoRA rank 16, conflicting rows in every expert", {"conflicts": [100] * n, "ranks": [16] * n}),
        ("LoRA, no conflicting row (the residual merge alone)", {"conflicts": [0] * n, "ranks": [16] * n}),
        ("dense, 1/8 of the rows conflicting per expert", {"conflicts": [shape[0] // 8] * n, "ranks": [None] * n}),
        ("dense, 1/4 of the rows conflicting per expert", {"conflicts": [shape[0] // 4] * n, "ranks": [None] * n}),
    ]
    lines = [
        "## OrthoMerge-C, one 70B `down_proj` (8192x28672, five bf16 experts), by its counted conflicts",
        "",
        "`orthomerge.memory` with the conflicting rows `plan` counts (float32, CPU): the working set of that tensor.",
        "",
        "| experts | subspace k | working set |",
        "|---|---|---|",
    ]
    for label, stats in cases:
        need = orthomerge.memory("model.layers.0.mlp.down_proj.weight", shape, n, params, 2, stats)
        k = orthomerge.subspace_bound(shape, n) if stats is None else orthomerge.measured_subspace(shape, stats)
        lines.append(f"| {label} | {k} | {(need.work + need.state) / 1e9:.1f} GB |")
        print(lines[-1], flush=True)
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "plan-8b-70b.md"))
    args = ap.parse_args(argv)
    lines = [
        "# Memory plans at 8B and 70B shapes",
        "",
        f"`python bench/plan_laptop.py`, {time.strftime('%Y-%m-%d')}: five experts + base, bf16, "
        "header-only inputs. RAM = planned peak anonymous memory (process + largest working set); GPU = planned peak "
        "GPU memory with `--assume-gpu 24GB --max-gpu-memory 22GB`; 'spilled' = tensors the GPU plan leaves on the "
        "CPU (one merged on the GPU with its per-expert state in RAM is not). These are plans; "
        "measured peaks are in memory-plan-vs-measured.md.",
        "",
    ]
    for shape in ("llama-3.1-8b", "llama-3.1-70b"):
        with tempfile.TemporaryDirectory() as root:
            make_shape_fixture.main([root, "--shape", shape, "--experts", "5"])
            lines += [
                f"## {shape}",
                "",
                "| method | CPU only: RAM | largest (CPU) | with GPU: GPU | with GPU: RAM | spilled |",
                "|---|---|---|---|---|---|",
            ]
            for method, params in CASES:
                label = method + "".join(f" {k}={v}" for k, v in params.items())
                cpu, gpu = plan(root, method, params, False), plan(root, method, params, True)
                worst = max(cpu.tensors, key=lambda t: t.host_bytes)
                lines.append(
                    f"| {label} | {cpu.peak_host / 1e9:.2f} GB | {worst.name.split('.')[-2]} "
                    f"{'x'.join(map(str, worst.shape))} | "
                    f"{gpu.peak_gpu / 1e9:.2f} GB | {gpu.peak_host / 1e9:.2f} GB | {len(gpu.spilled)} |"
                )
                print(lines[-1], flush=True)
            lines.append("")
    lines += conflict_working_sets()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
