#!/usr/bin/env python3
"""A whole model's merge time on this CPU, projected from one measured tensor.

    python bench/project_time.py bench/results/wide-memory-iso-cts-70b-down.json
    python bench/project_time.py --model llama-3.1-8b --method orthomerge --param target=global \
        --shape 4096 14336 --experts 5 --threads 2 --seconds 1000

`streammerge plan`'s cost model (Method.cost at rates calibrated here, engine/estimate.py, with the
record's thread count) gives the measured tensor's estimate and every tensor's of five experts of
`--model`'s shape (default Llama-3-70B, 80 layers; tools/make_shape_fixture.py's layouts); the
projection is the model's estimate times the measured tensor's ratio measured / estimated (its
compute only: reading the inputs adds its own time at the disk's rate). The measurement comes from
a `bench/wide_memory.py` record or from the flags. The ratio corrects the model
where it is off for the method at hand, on the assumption that it is off alike for the layer's
other tensors, and that the measured tensor took the path the model prices (not, say, OrthoMerge-C
finding no conflicting row and merging only its residual). With two threads or more the model counts
per-expert solves two at a time (Cost.paired), as `plan` does where they fit --max-ram;
`--one-at-a-time` prices them one after the other. Prints one markdown table; `--append` adds it to
the record's .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_shape_fixture  # noqa: E402

from streammerge.engine.estimate import calibrate, tensor_compute_seconds  # noqa: E402
from streammerge.methods import get_method  # noqa: E402
from streammerge.units import format_duration  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", nargs="?", help="a bench/results/wide-memory-*.json of one tensor")
    ap.add_argument("--model", default="llama-3.1-70b", choices=sorted(make_shape_fixture.SHAPES))
    ap.add_argument("--method", help="without a record: the method measured")
    ap.add_argument("--param", action="append", default=[], help="without a record: KEY=VALUE")
    ap.add_argument("--shape", nargs=2, type=int, help="without a record: the tensor's [out, in]")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--seconds", type=float, help="without a record: the measured seconds")
    ap.add_argument("--threads", type=int, default=None, help="default: the record's, else 1")
    ap.add_argument("--one-at-a-time", action="store_true", help="price per-expert solves one after the other")
    ap.add_argument("--append", action="store_true", help="append the table to the record's .md")
    args = ap.parse_args(argv)
    if args.record:
        record = json.load(open(args.record))
    else:
        if not (args.method and args.shape and args.seconds):
            ap.error("give a record, or --method, --shape and --seconds")
        record = {"method": args.method, "params": args.param, "shape": args.shape, "experts": args.experts,
                  "seconds": args.seconds}  # fmt: skip
    torch.set_num_threads(args.threads or record.get("threads") or 1)
    method = get_method(record["method"])[0]
    import yaml

    params = method.params_type(
        **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in record.get("params") or [])}
    )
    n, shape = record["experts"], tuple(record["shape"])
    rates = calibrate(types.SimpleNamespace(sources=[]), torch.device("cpu"))
    name = "model.layers.0.mlp.down_proj.weight" if shape[0] < shape[1] else "model.layers.0.mlp.up_proj.weight"
    paired = torch.get_num_threads() >= 2 and not args.one_at_a_time
    one = tensor_compute_seconds(method.cost(name, shape, n, params), shape, n, rates, paired)
    ratio = record["seconds"] / one
    tensors = make_shape_fixture.layout(*make_shape_fixture.SHAPES[args.model])
    total = sum(
        tensor_compute_seconds(method.cost(t, s, n, params), s, n, rates, paired) for t, s in tensors if len(s) == 2
    )
    lines = [
        "",
        f"### Projected to a whole {args.model} merge (`python bench/project_time.py {' '.join(sys.argv[1:])}`)",
        "",
        f"{torch.get_num_threads()} thread(s), solves {'two' if paired else 'one'} at a time; calibrated rates: "
        f"matmul {rates.matmul / 1e9:.1f} GFLOP/s, "
        f"factorisation {rates.factorisation / 1e9:.2f} G units/s, memory {rates.memory / 1e9:.1f} GB/s.",
        "",
        "| | seconds |",
        "|---|---|",
        f"| this tensor, measured | {record['seconds']:.0f} |",
        f"| this tensor, `plan`'s cost model | {one:.0f} (measured / model = {ratio:.2f}) |",
        f"| every 2-D tensor of {n} {args.model} experts, cost model | {total:.0f} ({format_duration(total)}) |",
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
