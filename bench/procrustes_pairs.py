#!/usr/bin/env python3
"""What OrthoMerge on the CPU would gain from two experts' Procrustes solves side by side, each on
one thread, against today's one after the other (issue #27.5: the factorisations run on one thread
so that the output does not depend on the thread count, math/lapack.py; the experts' solves are
independent of each other once the subspace is built, and a matrix product's bytes do not depend
on the thread count either, so two solves at once on one thread each give the same bytes).

    python bench/procrustes_pairs.py [--shapes 896x896 896x4864:float32] [--experts 4] [--pairs 2]

For each shape [out, in] (and the linear algebra's dtype, float64 unless given): a random base and
`--experts` targets (base + 5 % noise, the global target), the subspace built from them, then every
expert's `procrustes` timed (a) in turn with two threads for the products, as `merge` runs them, and
(b) two at a time, each on one thread, as the merge pairs them (math/side_by_side.py); alternating,
`--pairs` times; whether (b)'s rotations and generators equal (a)'s bit for bit. Results:
bench/results/procrustes-pairs.{json,md} (recorded before the merge had its own pairing, with (b)
on a pool of two threads: the same work on the same two threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import provenance, provenance_line, write_results  # noqa: E402

from streammerge.math import side_by_side  # noqa: E402
from streammerge.math.procrustes import SubspaceBuilder, procrustes  # noqa: E402


def solved(targets, basis, pair: bool):
    """Every target's rotation as the merge solves them (math/side_by_side.py), on two threads:
    one after the other, or two at a time (`pair`)."""
    torch.set_num_threads(2)
    pairs = side_by_side.each(len(targets), lambda i: targets[i].clone(), lambda t: procrustes(t, basis), pair)
    return [rot for _, rot in pairs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["896x896", "896x4864:float32"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    for spec in args.shapes:
        shape, _, dtype = spec.partition(":")
        out, inn = map(int, shape.split("x"))
        torch.manual_seed(0)
        a = torch.randn(out, inn)
        targets = [a + 0.05 * torch.randn(out, inn) for _ in range(args.experts)]
        builder = SubspaceBuilder(a, 1e-2, getattr(torch, dtype or "float64"))
        for t in targets:
            builder.add(t - a)
        basis = builder.build()
        times: dict[str, list[float]] = {"in_turn": [], "side_by_side": []}
        identical = True
        for pair in range(args.pairs):
            order = ["in_turn", "side_by_side"] if pair % 2 == 0 else ["side_by_side", "in_turn"]
            got = {}
            for way in order:
                start = time.perf_counter()
                got[way] = solved(targets, basis, way != "in_turn")
                times[way].append(time.perf_counter() - start)
            identical &= all(
                torch.equal(x.r_w, y.r_w) and torch.equal(x.q_w, y.q_w)
                for x, y in zip(got["in_turn"], got["side_by_side"])
            )
        row = {"shape": [out, inn], "dtype": dtype or "float64", "k": basis.k, "experts": args.experts, **times}
        row["ratio"] = statistics.median(times["side_by_side"]) / statistics.median(times["in_turn"])
        row["identical"] = identical
        rows.append(row)
        print(row, flush=True)
    doc = {**provenance("procrustes_pairs.py", load), "torch": torch.__version__, "rows": rows}
    lines = [
        "# Procrustes solves of several experts: in turn, or two side by side on one thread each",
        "",
        provenance_line(doc) + f"; torch {torch.__version__}.",
        "",
        "| shape [out, in] | dtype | k | experts | in turn (s) | side by side (s) | side by side / in turn "
        "| bytes equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | {r['k']} | {r['experts']} | "
            f"{', '.join(f'{t:.1f}' for t in r['in_turn'])} | {', '.join(f'{t:.1f}' for t in r['side_by_side'])} | "
            f"{r['ratio']:.2f} | {r['identical']} |"
        )
    write_results("procrustes-pairs", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
