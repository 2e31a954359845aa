#!/usr/bin/env python3
"""Whether DARE's exact L1 norms (streammerge/math/exact_sum.py) equal the float64 sums of torch
they replaced, on real task vectors: for every tensor of at least 2¹⁶ entries and every expert of
a preset, ‖τ‖₁ with torch's `abs().sum(dtype=torch.float64)` on 1 and on 2 threads, against the
exact sum rounded once. Equal everywhere means the change of definition changed no byte.

    python bench/exact_norms.py [--preset bench/.work/0.5b]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_model, provenance, provenance_line, write_results  # noqa: E402

from streammerge.math import exact_sum  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench/.work/0.5b", help="a folder with base/ and expert-*/")
    args = ap.parse_args()
    load = os.getloadavg()
    base = load_model(os.path.join(args.preset, "base"))
    experts = sorted(d for d in os.listdir(args.preset) if d.startswith("expert-"))
    threads = torch.get_num_threads()
    checked = differ = 0
    worst = []
    try:
        for name in experts:
            model = load_model(os.path.join(args.preset, name))
            for key, b in base.items():
                if b.numel() < 1 << 16 or not b.is_floating_point():
                    continue
                tau = model[key].float() - b.float()
                sums = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    sums.append(float(tau.abs().sum(dtype=torch.float64)))
                exact = exact_sum.abs_sum(tau)
                checked += 1
                if any(s != exact for s in sums):
                    differ += 1
                    worst.append(f"{name} {key}: torch {sums}, exact {exact!r}")
    finally:
        torch.set_num_threads(threads)
    doc = {**provenance("exact_norms.py", load), "preset": args.preset, "tensors_checked": checked,
           "differ": differ, "differences": worst}  # fmt: skip
    lines = [
        f"# torch's float64 L1 norms against exact ones: {args.preset}",
        "",
        f"{provenance_line(doc)}. Task vectors (expert − base, float32) of every tensor of at least 2¹⁶ "
        f"entries and every expert: {checked} checked, {differ} where torch's sum on 1 or 2 threads "
        "differs from the exact sum rounded once.",
        *([""] + worst if worst else []),
    ]
    write_results("exact-norms-" + os.path.basename(os.path.normpath(args.preset)), doc, lines)


if __name__ == "__main__":
    main()
