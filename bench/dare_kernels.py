#!/usr/bin/env python3
"""DARE's kernels timed alone (numba, the `fast` extra): drawing three experts' masks as bits, the two
L1 norms, the masking combine, beside task arithmetic's combine of the same bf16 inputs, torch's
float32 → bf16 conversion of the result, and the combine rounding its result to bf16 itself.
Synthetic bf16 tensors of --entries entries, three experts; the best of --repeats, in ns per entry
of the result.

    python bench/dare_kernels.py [--entries 30506496] [--repeats 3]
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

from streammerge.math import exact_sum, fused, torch_rand  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=4864 * 896 * 7)
    ap.add_argument("--repeats", type=int, default=3)
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
    }
    ns = {}
    for name, step in steps.items():
        step()  # compiled or loaded from numba's cache first
        best = min(_timed(step) for _ in range(args.repeats))
        ns[name] = best / n * 1e9
    doc = {**provenance("dare_kernels.py", load), "entries": n, "threads": torch.get_num_threads(), "ns_per_entry": ns}
    lines = [
        "# DARE's kernels alone",
        "",
        f"{provenance_line(doc)}; {n:,} entries, three bf16 experts, {doc['threads']} threads, best of {args.repeats}.",
        "",
        "| step | ns per entry of the result |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in ns.items()],
    ]
    write_results("dare-kernels", doc, lines)


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
