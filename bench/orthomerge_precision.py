#!/usr/bin/env python3
"""OrthoMerge in float32 against float64: the error of the merged update, and the time, per shape.

    python bench/orthomerge_precision.py [--shapes 1024x4096 4096x1024 ...] [--experts 5] [--out FILE]

Per shape: a base N(0, 1/in) and N experts = base + a rank-16 update of 1 % of the base's norm
plus dense noise of 0.1 % (LoRA-like fine-tunes), bf16-rounded like stored weights; merged by
OrthoMerge-G and -C (TA residual) with precision float64 and float32 on the CPU. Reported:
‖W₃₂ − W₆₄‖_F / ‖W₆₄ − W₀‖_F (relative error of the update) and the seconds of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge.methods import TensorTask, get_method  # noqa: E402
from streammerge.methods.orthomerge import OrthoMergeParams  # noqa: E402


class Experts:
    def __init__(self, ws):
        self.ws = ws

    def __len__(self):
        return len(self.ws)

    def __getitem__(self, i):
        return self.ws[i].clone()


def make(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, inn = shape
    base = (torch.randn(shape, generator=g) / inn**0.5).bfloat16().float()
    experts = []
    for _ in range(n):
        d = torch.randn(out, 16, generator=g) @ torch.randn(16, inn, generator=g)
        noise = torch.randn(shape, generator=g)
        w = base + d * (0.01 * base.norm() / d.norm()) + noise * (0.001 * base.norm() / noise.norm())
        experts.append(w.bfloat16().float())
    return base, experts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "1024x4096", "2048x2048"])
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    method, _ = get_method("orthomerge")
    rows = []
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split("x"))
        base, experts = make(shape, args.experts)
        for target in ("global", "conflict"):
            result, seconds = {}, {}
            for precision in ("float64", "float32"):
                task = TensorTask("w.weight", base.clone(), Experts(experts), (1.0,) * args.experts)
                t = time.perf_counter()
                result[precision] = method.merge(task, OrthoMergeParams(target=target, precision=precision))
                seconds[precision] = time.perf_counter() - t
            update = float((result["float64"] - base).norm())
            err = float((result["float32"] - result["float64"]).norm()) / max(update, 1e-30)
            row = {
                "shape": list(shape),
                "target": target,
                "experts": args.experts,
                "relative_error": err,
                "seconds_float64": round(seconds["float64"], 2),
                "seconds_float32": round(seconds["float32"], 2),
            }
            rows.append(row)
            print(
                f"{text:>10} {target:8s} rel. error {err:.2e}  float64 {seconds['float64']:7.2f} s  float32 "
                f"{seconds['float32']:7.2f} s",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": platform.machine(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d"),
                    "command": "python bench/orthomerge_precision.py " + " ".join(argv or sys.argv[1:]),
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
