#!/usr/bin/env python3
"""A whole 70B merge's time on this CPU, projected from one measured tensor.

    python bench/project_70b.py bench/results/wide-memory-iso-cts-70b-down.json

`streammerge plan`'s cost model (Method.cost at rates calibrated here, engine/estimate.py, with the
record's thread count) gives the measured tensor's estimate and every tensor's of five
Llama-3-70B-shaped experts (80 layers, tools/make_shape_fixture.py's layout); the projection is
the model's estimate times the measured tensor's ratio measured / estimated (its compute only:
reading 6 × 141 GB of inputs adds its own time at the disk's rate). The ratio corrects the model
where it is off for the method at hand, on the assumption that it is off alike for the layer's
other tensors, and that the measured tensor took the path the model prices (not, say, OrthoMerge-C
finding no conflicting row and merging only its residual). Prints one markdown table; `--append`
adds it to the record's .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_shape_fixture  # noqa: E402

from streammerge.engine.estimate import calibrate  # noqa: E402
from streammerge.methods import get_method  # noqa: E402
from streammerge.units import format_duration  # noqa: E402


def compute_seconds(method, name: str, shape: tuple[int, ...], n: int, params, rates) -> float:
    """As engine/estimate.py's estimate, for one tensor."""
    cost = method.cost(name, shape, n, params)
    return (
        cost.passes * math.prod(shape) * n * 4 / rates.memory
        + cost.flops / rates.matmul
        + (cost.factorisation / rates.factorisation)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", help="a bench/results/wide-memory-*.json of a tensor at a 70B shape")
    ap.add_argument("--threads", type=int, default=None, help="default: the record's, else 1")
    ap.add_argument("--append", action="store_true", help="append the table to the record's .md")
    args = ap.parse_args(argv)
    record = json.load(open(args.record))
    torch.set_num_threads(args.threads or record.get("threads") or 1)
    method = get_method(record["method"])[0]
    import yaml

    params = method.params_type(
        **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in record.get("params") or [])}
    )
    n, shape = record["experts"], tuple(record["shape"])
    rates = calibrate(types.SimpleNamespace(sources=[]), torch.device("cpu"))
    name = "model.layers.0.mlp.down_proj.weight" if shape[0] < shape[1] else "model.layers.0.mlp.up_proj.weight"
    one = compute_seconds(method, name, shape, n, params, rates)
    ratio = record["seconds"] / one
    tensors = make_shape_fixture.layout(*make_shape_fixture.SHAPES["llama-3.1-70b"])
    total = sum(compute_seconds(method, t, s, n, params, rates) for t, s in tensors if len(s) == 2)
    lines = [
        "",
        f"### Projected to a whole 70B merge (`python bench/project_70b.py {args.record}`)",
        "",
        f"{torch.get_num_threads()} thread(s); calibrated rates: matmul {rates.matmul / 1e9:.1f} GFLOP/s, "
        f"factorisation {rates.factorisation / 1e9:.2f} G units/s, memory {rates.memory / 1e9:.1f} GB/s.",
        "",
        "| | seconds |",
        "|---|---|",
        f"| this tensor, measured | {record['seconds']:.0f} |",
        f"| this tensor, `plan`'s cost model | {one:.0f} (measured / model = {ratio:.2f}) |",
        f"| every 2-D tensor of five 70B experts, cost model | {total:.0f} ({format_duration(total)}) |",
        f"| the same × {ratio:.2f} (projection, compute only) | {total * ratio:.0f} "
        f"({format_duration(total * ratio)}) |",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.record.removesuffix(".json") + ".md", "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
