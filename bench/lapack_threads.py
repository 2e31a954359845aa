#!/usr/bin/env python3
"""What running factorisations on one CPU thread costs (streammerge/math/lapack.py).

    python bench/lapack_threads.py

torch.linalg.svd and eigh at a few sizes, float32 and float64, with 1 and with 2 threads,
alternating, three times each; the medians and their ratio. Results: bench/results/lapack-threads.{json,md}.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402


def timed(fn, a: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn(a)
    return time.perf_counter() - start


def main() -> int:
    g = torch.Generator().manual_seed(0)
    ops = {"svd": lambda a: torch.linalg.svd(a, full_matrices=False), "eigh": lambda a: torch.linalg.eigh(a @ a.T)}
    rows = []
    loads = [os.getloadavg()[0]]
    for n in (1500, 3000):
        for dtype in (torch.float32, torch.float64):
            a = torch.randn(n, n, generator=g, dtype=dtype)
            for name, fn in ops.items():
                one, two = [], []
                for _ in range(3):
                    one.append(timed(fn, a, 1))
                    two.append(timed(fn, a, 2))
                rows.append(
                    {
                        "op": name,
                        "n": n,
                        "dtype": str(dtype).removeprefix("torch."),
                        "one_thread_s": round(statistics.median(one), 3),
                        "two_threads_s": round(statistics.median(two), 3),
                    }
                )
                print(rows[-1], flush=True)
    loads.append(os.getloadavg()[0])
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/lapack_threads.py",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_1min": [round(x, 2) for x in loads],
        "rows": rows,
    }
    lines = [
        f"# Factorisations on one CPU thread against two ({doc['date']})",
        "",
        f"`{doc['command']}` on this {doc['cores']}-core machine, torch {doc['torch']}, load average {loads[0]:.2f} "
        "before, "
        f"{loads[1]:.2f} after; medians of three alternating calls. (For `eigh` the time includes forming A·Aᵀ, a "
        "product.)",
        "",
        "| op | n | dtype | 1 thread | 2 threads | 1 / 2 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['n']} | {r['dtype']} | {r['one_thread_s']} s | {r['two_threads_s']} s | "
            f"{r['one_thread_s'] / r['two_threads_s']:.2f} |"
        )
    write_results("lapack-threads", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
