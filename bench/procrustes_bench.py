#!/usr/bin/env python3
"""Per-matrix cost of OrthoMerge's rotation extraction beside a plain SVD of the same matrix.

    python bench/procrustes_bench.py --shapes 4096x4096 1024x4096 --device cpu

For each shape [out, in]: a random base W₀ and one expert W₀ + δ (δ full rank, 1 % of W₀'s
scale, i.e. the global target). Times (a) the subspace build (base SVD + the expert's rows),
(b) Procrustes + inverse Cayley for that expert, (c) the Cayley map of a generator of the
subspace's size, and (d) torch.linalg.svd of W₀ itself (full_matrices=True), in float32 and
float64. Writes bench/results/procrustes.md rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge.math.cayley import cayley  # noqa: E402
from streammerge.math.procrustes import SubspaceBuilder, procrustes  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x4096"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "procrustes.md")
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for text in args.shapes:
        out_f, in_f = (int(x) for x in text.split("x"))
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
        b = a + 0.01 * (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
        for precision in (torch.float32, torch.float64):

            def build():
                builder = SubspaceBuilder(a, 1e-2, precision)
                builder.add(b - a)
                return builder.build()

            sub, t_build = timed(build, device)
            rot, t_proc = timed(lambda: procrustes(b, sub), device)
            q = rot.dense_q()
            _, t_cayley = timed(lambda: cayley(q), device)
            _, t_svd = timed(lambda: torch.linalg.svd(a.to(precision)), device)
            name = str(precision).removeprefix("torch.")
            rows.append(
                f"| {text} | {name} | {sub.k} | {0 if rot.frame is None else rot.frame.shape[1]} | {t_build:.2f} s | "
                f"{t_proc:.2f} s | {t_cayley:.2f} s | {t_svd:.2f} s |"
            )
            print(rows[-1], flush=True)
    with open(args.out, "a") as f:
        f.write(
            f"\n`python bench/procrustes_bench.py --shapes {' '.join(args.shapes)} --device {args.device}` on "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n\n"
        )
        f.write(
            "| shape | precision | k (subspace) | frame width | subspace build | Procrustes + inverse Cayley | Cayley "
            "(k×k) | plain full SVD of W₀ |\n|---|---|---|---|---|---|---|---|\n"
        )
        f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
