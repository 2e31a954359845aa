#!/usr/bin/env python3
"""The polar factor of a near-orthogonal matrix (what OrthoMerge's Procrustes completions and
angle resets need) by Newton–Schulz iterations (math/robust.py) against the SVD, at 2048² and
4096², float32 and float64: time and orthogonality error, alternating, on this machine.

    python bench/polar_bench.py [--sizes 2048 4096] [--repeats 2]

Input: Q R with Q a random rotation and R = I + 0.01·G (G Gaussian/√n): singular values within
a few percent of 1. Writes bench/results/polar.md and .json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
from streammerge.math.robust import newton_schulz_polar  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402


def near_orthogonal(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (
        q @ (torch.eye(n, dtype=torch.float64) + 0.01 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5)
    ).to(dtype)


def svd_polar(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    load = os.getloadavg()
    for n in args.sizes:
        for dtype in (torch.float32, torch.float64):
            m = near_orthogonal(n, dtype)
            ref = svd_polar(m.double())
            times = {"newton_schulz": [], "svd": []}
            errors = {}
            for rep in range(args.repeats):
                for name in ("newton_schulz", "svd") if rep % 2 == 0 else ("svd", "newton_schulz"):
                    start = time.perf_counter()
                    x = newton_schulz_polar(m) if name == "newton_schulz" else svd_polar(m)
                    times[name].append(time.perf_counter() - start)
                    assert x is not None
                    errors[name] = float(torch.linalg.matrix_norm(x.double() - ref) / n**0.5)
            row = {
                "n": n,
                "dtype": str(dtype).removeprefix("torch."),
                **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                **{f"{k}_error": v for k, v in errors.items()},
            }
            rows.append(row)
            print(row, flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "command": "python bench/polar_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    lines = [
        "# Polar factor of a near-orthogonal matrix: Newton–Schulz vs SVD",
        "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}; load average {load[0]:.2f} before, "
        f"{doc['load_average_after'][0]:.2f} after. "
        "Median of the repeats, alternating; error = ‖X − X_ref‖_F/√n against a float64 SVD.",
        "",
        "| n | dtype | Newton–Schulz | SVD | NS / SVD time | NS error | SVD error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['dtype']} | {r['newton_schulz_s']:.2f} s | {r['svd_s']:.2f} s | "
            f"{r['newton_schulz_s'] / r['svd_s']:.2f} | "
            f"{r['newton_schulz_error']:.1e} | {r['svd_error']:.1e} |"
        )
    write_results("polar", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
