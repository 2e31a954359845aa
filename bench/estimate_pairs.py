#!/usr/bin/env python3
"""What `plan`'s time estimate says OrthoMerge's paired solves save, on given inputs.

    python bench/estimate_pairs.py --base B --expert E1 --expert E2 … [--param K=V …]

Plans the OrthoMerge merge of the inputs with `--threads 1` (solves one after the other) and
`--threads 2` (two at a time where the plan counts them, TensorPlan.side_by_side) and prints each
plan's estimated compute from the same rates, calibrated once here (engine/estimate.py), and their
ratio: the estimate's counterpart of a measured `--threads 1` / `--threads 2` pair
(bench/orthomerge_speedup.py). Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge import Expert, Recipe  # noqa: E402
from streammerge.engine import Merge, RunOptions  # noqa: E402
from streammerge.engine import estimate as estimate_module  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--expert", action="append", required=True)
    ap.add_argument("--param", action="append", default=[], help="KEY=VALUE, as merge's --param")
    ap.add_argument("--max-ram", type=float, default=20.0, help="GB (default 20)")
    args = ap.parse_args()
    import yaml

    params = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.param)}
    recipe = Recipe("orthomerge", args.base, tuple(Expert(e) for e in args.expert), "/nonexistent-out", params)
    calibrate, rates, seconds = estimate_module.calibrate, None, {}
    for threads in (1, 2):
        job = Merge(recipe, RunOptions(device="cpu", threads=threads, quiet=True, max_ram=int(args.max_ram * 1e9)))
        try:
            rates = rates or calibrate(job.inputs, job.device)
            estimate_module.calibrate = lambda inputs, device: rates
            seconds[threads] = job.estimate().compute_seconds
            paired = sum(1 for t in job.plan.tensors if t.side_by_side)
        finally:
            estimate_module.calibrate = calibrate
            job.close()
        print(f"--threads {threads}: estimated compute {seconds[threads]:.1f} s, {paired} tensor(s) paired")
    print(f"two at a time / one after the other: {seconds[2] / seconds[1]:.3f} (rates: {rates})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
