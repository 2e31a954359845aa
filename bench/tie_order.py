#!/usr/bin/env python3
"""Is mergekit's choice among magnitudes tied at the TIES threshold reproducible? Measured with
mergekit 0.1.5 itself, on one machine and one torch, varying only what a user does not choose.

    python bench/tie_order.py [--preset 0.5b] [--density 0.5] [--reuse]

mergekit keeps the k largest |τ| by `torch.argsort(|τ|, descending=True)[:k]`, an unstable sort;
which of the entries tied at the k-th value it keeps is whatever that sort's algorithm leaves
first. torch's CPU sort picks its algorithm by the CPU's instruction set at run time
(x86-simd-sort's AVX2 or AVX-512 quicksort, std::sort otherwise; on CUDA a radix sort), so this
script runs the same mergekit TIES recipe (bench/vs_mergekit.py's, bf16, three experts of the
preset) under ATEN_CPU_CAPABILITY=default, avx2 (and avx512 where the CPU has it), and with 1 and
2 threads, and counts the output entries that differ between runs. Beside them: streammerge's
merge of the same recipe with `tie_break: mergekit` (the same argsort, so it follows the machine)
and `tie_break: index` (the earliest tied entries in row-major order: no sort, the same on every
machine and device), and how many entries those two differ by.
Results: bench/results/tie-order.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_model, write_results  # noqa: E402
from vs_mergekit import recipe  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
import mergekit_env  # noqa: E402


def differ(a: str, b: str) -> int:
    x, y = load_model(a), load_model(b)
    assert sorted(x) == sorted(y)
    return sum(int((x[k].view(-1).view(torch_int(x[k])) != y[k].view(-1).view(torch_int(y[k]))).sum()) for k in x)


def torch_int(t):
    import torch

    return {2: torch.int16, 4: torch.int32}[t.element_size()]


PROBE = """
import sys, torch
torch.manual_seed(0)
base = (torch.randn(4096, 4096) * 0.02).to(torch.bfloat16)
expert = (base.float() + torch.randn(4096, 4096) * 0.002).to(torch.bfloat16)
w = (expert.float() - base.float()).abs().reshape(-1)  # a float32 |tau| of bf16 weights: many ties
keep = torch.zeros(w.numel(), dtype=torch.bool)
keep[torch.argsort(w, descending=True)[: int(0.2 * w.numel())]] = True  # mergekit's magnitude()
torch.save(keep, sys.argv[1])
"""


def synthetic(work: str, caps: list[str]) -> list[dict]:
    """mergekit's selection (its argsort line) on a 4096x4096 synthetic task vector at density 0.2,
    under each CPU capability and thread count: which tied entries are kept."""
    import torch

    masks = {}
    for cap, threads in [(cap, 2) for cap in caps] + [("avx2", 1)]:
        path = os.path.join(work, f"tie-order-probe-{cap}-{threads}.pt")
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, "-c", PROBE, path], env=env, check=True)
        masks[f"{cap} {threads}t"] = torch.load(path)
    exec(PROBE.split("keep =")[0], scope := {"torch": torch})  # the same |tau|, to count its ties
    w = scope["w"]
    k = int(0.2 * w.numel())
    threshold = w.sort(descending=True).values[k - 1]
    earliest = torch.zeros(w.numel(), dtype=torch.bool)
    earliest[torch.argsort(w, descending=True, stable=True)[:k]] = True
    masks["earliest tied entries (tie_break: index)"] = earliest
    tied, kept_ties = int((w == threshold).sum()), k - int((w > threshold).sum())
    names = list(masks)
    return [{"a": a, "b": b, "kept_entries_that_differ": int((masks[a] != masks[b]).sum()) // 2, "kept": k,
             "tied_at_threshold": tied, "ties_kept": kept_ties}
            for i, a in enumerate(names) for b in names[i + 1 :]]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", ".work"))
    ap.add_argument("--reuse", action="store_true", help="keep outputs an earlier run left in --work")
    args = ap.parse_args()
    python = mergekit_env.ensure_mergekit()
    if python is None:
        raise SystemExit("mergekit 0.1.5 could not be installed")
    data = os.path.join(args.work, args.preset)
    if not os.path.exists(os.path.join(data, "expert-3")):
        make = [os.path.join(ROOT, "tools", "make_toy_models.py"), data, "--preset", args.preset]
        subprocess.run([sys.executable, *make, "--experts", "3", "--shared", "0.7", "--shard-size", "2GB"], check=True)
    experts = [os.path.join(data, f"expert-{i}") for i in (1, 2, 3)]
    yaml_path = os.path.join(args.work, f"tie-order-{args.preset}.yaml")
    with open(yaml_path, "w") as f:
        f.write(recipe("ties", os.path.join(data, "base"), experts, args.density))
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    caps = ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])
    runs = [(cap, 2) for cap in caps] + [("avx2", 1)]
    outs: dict[str, str] = {}
    seconds: dict[str, float] = {}
    previous = os.path.join(ROOT, "bench", "results", "tie-order.json")
    if args.reuse and os.path.exists(previous):  # the reused outputs' times, as that run measured them
        seconds = json.load(open(previous)).get("seconds", {})
    for cap, threads in runs:
        key = f"mergekit {cap} {threads}t"
        out = os.path.join(args.work, "tie-order", key.replace(" ", "-"))
        outs[key] = out
        if args.reuse and os.path.exists(os.path.join(out, "config.json")):
            continue  # merged by an earlier run of this script (same inputs, same mergekit)
        shutil.rmtree(out, ignore_errors=True)
        cases = os.path.join(args.work, "tie-order-cases.json")
        with open(cases, "w") as f:
            json.dump([{"recipe": yaml_path, "out": out}], f)
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
        start = time.perf_counter()
        subprocess.run([python, os.path.join(ROOT, "tools", "run_mergekit.py"), cases, cases + ".out"], env=env,
                       check=True)  # fmt: skip
        seconds[key] = round(time.perf_counter() - start, 1)
        assert json.load(open(cases + ".out")) == ["ok"], open(cases + ".out").read()
        outs[key] = out
        print(key, seconds[key], "s", flush=True)
    for tie in ("mergekit", "index"):
        key = f"streammerge tie_break={tie}"
        out = os.path.join(args.work, "tie-order", f"streammerge-{tie}")
        outs[key] = out
        if args.reuse and os.path.exists(os.path.join(out, "config.json")):
            continue
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "streammerge.cli", "merge", "--recipe", yaml_path, "--out", out,
                        "--device", "cpu", "--quiet", "--param", f"tie_break={tie}"], check=True)  # fmt: skip
        seconds[key] = round(time.perf_counter() - start, 1)
        outs[key] = out
    total = sum(t.numel() for t in load_model(outs[f"mergekit {caps[0]} 2t"]).values())
    pairs = [(f"mergekit {a} 2t", f"mergekit {b} 2t") for i, a in enumerate(caps) for b in caps[i + 1 :]]
    pairs += [
        ("mergekit avx2 2t", "mergekit avx2 1t"),
        ("streammerge tie_break=mergekit", "streammerge tie_break=index"),
    ]
    rows = [(a, b, differ(outs[a], outs[b])) for a, b in pairs]
    probe = synthetic(args.work, caps)
    doc = {
        "command": "python bench/tie_order.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu flags: "
        + " ".join(c for c in ("avx2", "avx512f") if c in flags),
        "torch": __import__("torch").__version__,
        "preset": args.preset,
        "density": args.density,
        "entries": total,
        "seconds": seconds,
        "differing_entries": [{"a": a, "b": b, "entries": n, "fraction": n / total} for a, b, n in rows],
        "synthetic_selection": probe,
    }
    lines = [
        "# Is mergekit's TIES tie order reproducible?",
        "",
        f"`{doc['command']}`, {doc['date']}, {doc['machine']}, torch {doc['torch']}, mergekit 0.1.5; "
        f"preset {args.preset} (bf16, three experts), mergekit's `ties` recipe with density {args.density}, "
        f"{total:,} output entries. Each run changes only the CPU capability torch dispatches to "
        "(`ATEN_CPU_CAPABILITY`) or the thread count.",
        "",
        "| output A | output B | entries that differ | fraction |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {n:,} | {n / total:.4%} |" for a, b, n in rows],
        "",
        "mergekit's selection line (`torch.argsort(|τ|, descending=True)[:k]`) on a synthetic 4096×4096 "
        "task vector of bf16 weights at density 0.2: kept entries that differ between two runs (of "
        f"{probe[0]['kept']:,} kept; {probe[0]['tied_at_threshold']:,} entries tie at the threshold, "
        f"{probe[0]['ties_kept']:,} of them are kept):",
        "",
        "| selection A | selection B | kept entries that differ |",
        "|---|---|---|",
        *[f"| {r['a']} | {r['b']} | {r['kept_entries_that_differ']:,} |" for r in probe],
    ]
    write_results("tie-order", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
