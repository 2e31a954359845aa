#!/usr/bin/env python3
"""The row-local kernels timed alone (numba, the `fast` extra). DARE's: drawing three experts' masks
as bits, the two L1 norms, the masking combine; beside task arithmetic's combine of the same bf16
inputs, torch's float32 → bf16 conversion of the result, and the combine rounding its result to
bf16 itself; and TIES's: the high-bit histogram pass (whole and its 1-in-8 sample), the pass that
also counts a span's low bits and captures where they lie, mergekit's TIES combine at density 0.5
and our own ties' trim and disjoint merge. Synthetic bf16 tensors of --entries entries, three
experts, in memory (no page faults of a mapped file); the best of --repeats, in ns per entry of the
result. The record names the streammerge it imported and its commit: to time another commit, put
its checkout first on the path (`PYTHONPATH=WORKTREE python bench/dare_kernels.py --tag T`).

    python bench/dare_kernels.py [--entries 30506496] [--repeats 3] [--tag dare-kernels]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, provenance_line, write_results  # noqa: E402

import streammerge  # noqa: E402
from streammerge.math import exact_sum, fused, torch_rand  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=4864 * 896 * 7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="dare-kernels")
    args = ap.parse_args()
    load, n = os.getloadavg(), args.entries
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    keep = np.zeros((3, (n + 7) // 8), np.uint8)
    weights = (1.0, 1.0, 1.0)

    def draw():
        keep[:] = 0
        torch_rand.keep_bits([torch_rand.TorchRand(i) for i in range(3)], [0.5] * 3, keep, [0, 1, 2], 0, n)

    def norms():
        before = np.zeros((3, exact_sum.EXACT_BINS), np.int64)
        fused.random_norms_bf16(experts, base, keep, [0, 1, 2], 0, before, before.copy())

    stored = fused.MagnitudeStored.for_experts(3)
    whole = [None]  # one block: the whole tensor

    def inputs(rows):
        return base, experts

    high = stored.count_span(inputs, whole, [-1] * 3)
    # each expert's median magnitude (density 0.5) as a bit pattern, and its high-bit bin
    medians = [int(torch.kthvalue((e.float() - base.float()).abs().view(torch.int32), n // 2).values) for e in experts]
    bins = [m >> 16 for m in medians]
    assert high.shape[0] == 3
    keep_all = [((0, 0), (0, 0))] * 3  # no window: ties at a bound go by modes NONE (0 ≤ lo, hi ≤ 0)

    def ties_combine():
        bounds = [(m, fused_never()) for m in medians]
        into = torch.empty(base.shape, dtype=torch.bfloat16)
        seen = [[0, 0] for _ in range(3)]
        stored.combine(experts, base, bounds, keep_all, [(0, 0)] * 3, seen, weights, "sum", True, 1.0, into)

    steps = {
        "masks drawn as bits": draw,
        "both L1 norms": norms,
        "masking combine": lambda: fused.random_combine_bf16(
            experts, base, keep, 0, [True] * 3, [1.1, 1.2, 1.3], weights, "sum", False, 1.0
        ),  # fmt: skip
        "task arithmetic's combine": lambda: fused.combine_bf16(experts, weights, base, "sum", False, 1.0),
        "float32 → bf16 (torch)": lambda: torch.empty(n, dtype=torch.float32).to(torch.bfloat16),
        "task arithmetic's combine, then torch's conversion to bf16": lambda: fused.combine_bf16(
            experts, weights, base, "sum", False, 1.0
        ).to(torch.bfloat16),
        "task arithmetic's combine rounding to bf16 itself": lambda: fused.combine_bf16(
            experts, weights, base, "sum", False, 1.0, torch.empty(base.shape, dtype=torch.bfloat16)
        ),
        "TIES: high bits, a 1-in-8 sample": lambda: stored.count_span(inputs, whole, [-1] * 3, fused.SAMPLE_EVERY),
        "TIES: high bits": lambda: stored.count_span(inputs, whole, [-1] * 3),
        "TIES: high bits, a span's low bits and their capture": lambda: stored.count_span(
            inputs, whole, [b - 1 for b in bins], 1, True
        ),
        "TIES: mergekit's combine (density 0.5, sign election), rounding to bf16": ties_combine,
        "ties (ours): trim and disjoint merge": lambda: stored.disjoint(experts, base, medians, weights, False, 1.0),
    }
    ns = {}
    for name, step in steps.items():
        step()  # compiled or loaded from numba's cache first
        best = min(_timed(step) for _ in range(args.repeats))
        ns[name] = best / n * 1e9
    doc = {**provenance("dare_kernels.py", load), "entries": n, "threads": torch.get_num_threads(),
           "streammerge": streammerge.__file__, "commit": _commit(), "ns_per_entry": ns}  # fmt: skip
    lines = [
        "# The row-local kernels alone",
        "",
        f"{provenance_line(doc)}; {n:,} entries, three bf16 experts, {doc['threads']} threads, best of {args.repeats};"
        f" streammerge at {doc['commit']} ({doc['streammerge']}).",
        "",
        "| step | ns per entry of the result |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in ns.items()],
    ]
    write_results(args.tag, doc, lines)


def fused_never() -> int:
    """A high bound no magnitude reaches (gta.NEVER)."""
    from streammerge.methods.gta import NEVER

    return NEVER


def _commit() -> str:
    import subprocess

    folder = os.path.dirname(os.path.dirname(os.path.abspath(streammerge.__file__)))
    done = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
