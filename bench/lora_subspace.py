#!/usr/bin/env python3
"""OrthoMerge-G over the quality benchmark's five LoRA experts (MiniLM-L6, seed 0), with the
rotation subspace taken from each adapter's A factor (now) and from its float32 dense copy (as
before): time per weight shape and the difference of the merged updates.

    pip install -e ".[quality]"; python bench/quality/train_experts.py --kinds lora --seeds 0
    python bench/lora_subspace.py          # → bench/results/lora-subspace.{md,json}

One thread; the two merges run one after the other in this process.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import time

import importlib.util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "quality"))
import torch  # noqa: E402

import run_benchmark  # noqa: E402  (bench/quality; its `common` is bench/quality/common.py)

_spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench", "common.py"))
bench_common = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench_common)  # type: ignore[union-attr]
from streammerge import methods  # noqa: E402
from streammerge.methods import orthomerge  # noqa: E402


def timed_merge(out: str) -> tuple[float, dict]:
    per_shape: collections.Counter = collections.Counter()
    inner = orthomerge._merge

    def timed(task, params):
        start = time.perf_counter()
        try:
            return inner(task, params)
        finally:
            per_shape["x".join(map(str, task.shape))] += time.perf_counter() - start

    orthomerge._merge = timed
    try:
        seconds = run_benchmark.merged("orthomerge", {"target": "global"}, "lora", 0, out)
    finally:
        orthomerge._merge = inner
    return seconds, dict(per_shape)


def main() -> int:
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    work = tempfile.mkdtemp()
    factors = methods.TensorTask.task_factors
    new_s, new_shapes = timed_merge(os.path.join(work, "factors"))
    methods.TensorTask.task_factors = lambda self, i: None  # the subspace from the dense copies
    try:
        old_s, old_shapes = timed_merge(os.path.join(work, "dense"))
    finally:
        methods.TensorTask.task_factors = factors

    def load(folder):
        out = {}
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                out |= load_file(os.path.join(folder, f))
        return out

    new, old = load(os.path.join(work, "factors")), load(os.path.join(work, "dense"))
    base = load(run_benchmark.model_folder())
    worst = max(
        float((new[k].double() - old[k].double()).norm() / max((old[k].double() - base[k].double()).norm(), 1e-30))
        for k in new
        if new[k].is_floating_point() and k in base
    )
    doc = {
        "command": "python bench/lora_subspace.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg(),
        "machine": f"{os.cpu_count()} cores",
        "seconds_factors": new_s,
        "seconds_dense_copy": old_s,
        "per_shape_factors": new_shapes,
        "per_shape_dense_copy": old_shapes,
        "max_relative_update_difference": worst,
    }
    lines = [
        "# OrthoMerge-G over five LoRA experts: subspace from the A factors vs from dense copies",
        "",
        f"`python bench/lora_subspace.py`, {doc['date']}, {doc['machine']}, one thread, load average "
        + ", ".join(f"{x:.2f}" for x in doc["load_average"])
        + "; MiniLM-L6, the quality benchmark's LoRA experts (seed 0).",
        "",
        "| weight shape | from the A factors (now) | from the dense copies (before) |",
        "|---|---|---|",
    ]
    for shape in sorted(old_shapes, key=lambda s: -old_shapes[s]):
        lines.append(f"| {shape} | {new_shapes.get(shape, 0):.2f} s | {old_shapes[shape]:.2f} s |")
    lines += [
        f"| whole merge (incl. I/O) | {new_s:.1f} s | {old_s:.1f} s |",
        "",
        f"Largest difference of a merged update between the two: {worst:.1e} of its norm.",
    ]
    bench_common.write_results("lora-subspace", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
