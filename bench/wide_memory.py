#!/usr/bin/env python3
"""Planned against measured peak anonymous memory (and time) of the wide-tensor paths of #29:
one wide weight [out, in] (out < in), a base and N experts, merged on the CPU.

    python bench/wide_memory.py --method iso_cts --shape 4096 14336 --experts 5 --tag iso-cts-8b
    python bench/wide_memory.py --method orthomerge --param target=global --shape 1024 3584 --tag om-g

The wide paths are taken above a size (spectral_common.WIDE_GRAM_ELEMENTS for the spectral
methods, orthomerge.LEAN_WIDE_K for OrthoMerge) that only 70B-sized weights pass; `--force`
(the default) lowers that size in the merge's own process so that a weight that fits this
machine's time takes the path. Each merge runs in a fresh process with `--max-ram 20GB` (or as given; freed
blocks go back to the OS, so the working set is measured: memwatch.py) and writes
`--memory-report`. Experts: the base plus a shared update with a random sign per row and expert
and noise (each conflicts with the mean on about a quarter of the rows), LoRA-like with
`--lora-rank R` (B A of rank R plus the bf16 rounding a dense checkpoint carries).
Results: bench/results/wide-memory-TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from bench.common import write_results  # noqa: E402

RUN = """
import sys
from streammerge.methods import spectral_common, orthomerge
if sys.argv[1] == "force":
    spectral_common.WIDE_GRAM_ELEMENTS = 0
    orthomerge.LEAN_WIDE_K = 0
from streammerge.cli import main
main(sys.argv[2:])
"""


def make_models(root: str, shape: tuple[int, int], experts: int, lora_rank: int | None) -> None:
    import torch

    from streammerge.io.atomic import ShardWriter

    name = "model.layers.0.mlp.down_proj.weight"
    out, inn = shape
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0)) / inn**0.5
    common = torch.randn(shape, generator=torch.Generator().manual_seed(99)) / inn**0.5
    for i in range(experts + 1):
        folder = os.path.join(root, "base" if i == 0 else f"expert-{i}")
        os.makedirs(folder)
        g = torch.Generator().manual_seed(i)
        if i == 0:
            w = base
        elif lora_rank:
            b = torch.randn(out, lora_rank, generator=g) / lora_rank**0.5
            a = torch.randn(lora_rank, inn, generator=g) / inn**0.5
            w = base + 0.05 * (b @ a)
        else:
            signs = torch.randint(0, 2, (out, 1), generator=g) * 2.0 - 1.0
            w = base + 0.02 * (signs * common + 0.3 * torch.randn(shape, generator=g) / inn**0.5)
        layout = [(name, "BF16", shape)]
        with ShardWriter(os.path.join(folder, "model.safetensors"), layout) as writer:
            writer.write(name, w.bfloat16())
            writer.commit()
        del w


def subspace_of(root: str, args) -> dict:
    """OrthoMerge's k for these inputs, counted as its plan counts it: every row for the global
    target (full-rank updates: bf16 rounding makes even LoRA-like ones so), the conflicting rows
    for the conflict target."""
    from safetensors.torch import load_file

    from streammerge.methods.orthomerge import conflicts_among, measured_subspace, subspace_bound

    name = "model.layers.0.mlp.down_proj.weight"
    load = lambda folder: load_file(os.path.join(root, folder, "model.safetensors"))[name].float()  # noqa: E731
    shape, n = tuple(args.shape), args.experts
    if "target=global" in args.param:
        return {"k": subspace_bound(shape, n), "conflicts": None}
    base = load("base")
    counts = [int(r.sum()) for r in conflicts_among([load(f"expert-{i}").sub_(base) for i in range(1, n + 1)])]
    return {"k": measured_subspace(shape, {"conflicts": counts, "ranks": [None] * n}), "conflicts": counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--param", action="append", default=[], help="KEY=VALUE, passed to the merge")
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 14336), metavar=("OUT", "IN"))
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--no-force", action="store_true", help="keep the size at which the wide path starts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-ram", default="20GB", help="the merge's budget; below its upper-bound plan, OrthoMerge-C "
                    "measures its conflicting rows and plans with them")  # fmt: skip
    ap.add_argument("--tag", required=True)
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        make_models(tmp, shape, args.experts, args.lora_rank)
        out, report = os.path.join(tmp, "out"), os.path.join(tmp, "report.json")
        cmd = ["merge", "--quiet", "--device", "cpu", "--method", args.method, "--base", os.path.join(tmp, "base")]
        for i in range(1, args.experts + 1):
            cmd += ["--expert", os.path.join(tmp, f"expert-{i}")]
        for p in args.param:
            cmd += ["--param", p]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += ["--out", out, "--max-ram", args.max_ram, "--memory-report", report]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", RUN, "keep" if args.no_force else "force", *cmd], check=True)
        seconds = time.perf_counter() - start
        rec = json.load(open(report))
        k = subspace_of(tmp, args) if args.method == "orthomerge" else None
    planned, measured = rec["planned_peak_ram"], rec["measured_peak_ram"]
    doc = {
        "method": args.method,
        "params": args.param,
        "threads": args.threads,
        "shape": shape,
        "experts": args.experts,
        "lora_rank": args.lora_rank,
        "forced": not args.no_force,
        "subspace_k": k,
        "planned_peak_ram": planned,
        "measured_peak_ram": measured,
        "seconds": round(seconds, 1),
        "load_before": round(load, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    argv_line = " ".join(["python", "bench/wide_memory.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"# Wide path: {args.method} {' '.join(args.param)} on one {shape[0]}x{shape[1]} weight, "
        f"{args.experts} experts",
        "",
        f"`{argv_line}`, {doc['date']}, {doc['machine']}, load average {load:.2f} before the run.",
        "",
        f"- planned peak anonymous memory {planned / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB "
        f"(measured/planned {measured / planned:.2f})",
        f"- wall time {seconds:.1f} s (the whole merge command, including start-up and writing)",
    ]
    if k is not None:
        lines.append(f"- rotation subspace k = {k['k']} (conflicting rows per expert: {k['conflicts']})")
    write_results(f"wide-memory-{args.tag}", doc, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
