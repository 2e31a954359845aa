#!/usr/bin/env python3
"""streammerge beside mergekit 0.1.5, measured side by side on this machine.

    python bench/vs_mergekit.py [--presets 0.5b 0.5b-128k 1.5b] [--methods task_arithmetic ties] [--pairs 3]

For each preset: generates a bf16 base and three experts (tools/make_toy_models.py --shared 0.7),
installs mergekit 0.1.5 into a virtual environment of its own (bench/.venv-mergekit, sharing this
Python's site packages for torch; skipped with a message if it cannot be installed), and runs both
tools on the same inputs with the same mergekit YAML (`mergekit-yaml` and
`streammerge merge --recipe`), alternating which goes first, `--pairs` pairs per configuration,
dropping the page cache before every run where the kernel allows it. Each run is timed by
/usr/bin/time -v (wall, user+sys CPU, peak RSS). The cold and warm I/O floor (reading every input
once with cat after dropping the cache, and again) is measured in the same run. Agreement:
task arithmetic — each tool's output against an exact float32 reference, in bf16 steps; TIES and
breadcrumbs_ties — the fraction of entries on which the two tools' outputs are equal; dare_ties —
none (its masks are random draws, mergekit's unseeded). Results: bench/results/
vs-mergekit.{md,json} with the machine, date, load averages and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches, load_model as load  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
import mergekit_env  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def ensure_mergekit() -> str | None:
    python = mergekit_env.ensure_mergekit()
    if python is None:
        print("mergekit 0.1.5 could not be installed; skipping the comparison")
        return None
    return os.path.join(os.path.dirname(python), "mergekit-yaml")


def timed(cmd: list[str]) -> dict:
    r = sh(["/usr/bin/time", "-v", *cmd])
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")

    def field(name: str) -> str:
        m = re.search(rf"{re.escape(name)}: (.*)", r.stderr)
        return m.group(1).strip() if m else "0"

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall)))
    return {
        "wall": seconds,
        "cpu": float(field("User time (seconds)")) + float(field("System time (seconds)")),
        "peak_rss": int(field("Maximum resident set size (kbytes)")) * 1024,
    }


def io_floor(files: list[str]) -> dict:
    dropped = drop_caches()
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return {"cold": cold, "warm": time.perf_counter() - t, "cache_dropped": dropped}


SPARSIFIED = ("ties", "dare_ties", "breadcrumbs_ties", "della")  # recipes with a per-model density
TWO_MODELS = {"slerp": 0.5, "nearswap": 0.001}  # the base and the first expert, with this t (nearswap: ~|Δ|)


def folders(method: str, base: str, experts: list[str]) -> list[str]:
    """The models a method's recipe reads: slerp and nearswap the base and the first expert, linear
    the experts, the others the base and every expert."""
    if method in TWO_MODELS:
        return [base, experts[0]]
    return experts if method == "linear" else [base, *experts]


def recipe(method: str, base: str, experts: list[str], density: float) -> str:
    """The mergekit YAML: weight 1 per model, `density` for the sparsified methods (della's ε 0.1),
    mergekit's defaults otherwise (TIES with `normalize: true`, as mergekit's examples)."""
    if method in TWO_MODELS:  # mergekit's form: the base listed among the models
        return (
            f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {experts[0]}\n"
            f"parameters: {{t: {TWO_MODELS[method]}}}\ndtype: bfloat16\n"
        )
    extra = (f", density: {density}" + (", epsilon: 0.1" if method == "della" else "")) if method in SPARSIFIED else ""
    models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0{extra}}}" for e in experts)
    head = f"merge_method: {method}\n" + ("" if method == "linear" else f"base_model: {base}\n")
    tail = "parameters: {normalize: true}\n" if method == "ties" else ""
    return f"{head}models:\n{models}\n{tail}dtype: bfloat16\n"


def bf16_steps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out − ref| in units of the bf16 spacing at ref (at values below 2⁻¹⁰ of the tensor's
    largest, the spacing there: near-cancellations are not counted as huge relative errors)."""
    floor = float(ref.abs().max()) * 2.0**-10 or 2.0**-126
    spacing = 2.0 ** torch.floor(torch.log2(ref.abs().clamp(min=floor) * 2.0**-7))
    return float(((out.float() - ref).abs() / spacing).max())


def agreement(method: str, base: str, experts: list[str], ours: str, theirs: str) -> dict:
    a, b = load(ours), load(theirs)
    if method == "task_arithmetic":
        b0 = load(base)
        es = [load(e) for e in experts]
        worst_ours = worst_theirs = 0.0
        for name, w0 in b0.items():
            ref = w0.float() + sum(e[name].float() - w0.float() for e in es)
            worst_ours = max(worst_ours, bf16_steps(a[name], ref))
            worst_theirs = max(worst_theirs, bf16_steps(b[name], ref))
        return {"streammerge_max_bf16_steps_from_exact": worst_ours, "mergekit_max_bf16_steps_from_exact": worst_theirs}
    if method.startswith(("dare", "della")):  # mergekit draws its masks from torch's unseeded global generator
        return {"note": "random masks: the two tools agree in distribution, not entry by entry"}
    equal = total = 0
    for name in a:
        equal += int((a[name] == b[name]).sum())
        total += a[name].numel()
    return {"fraction_of_entries_equal": equal / total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["0.5b", "0.5b-128k", "1.5b"])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", ".work"))
    ap.add_argument("--tag", default="vs-mergekit")
    ap.add_argument("--again", action="store_true", help="write TAG.md anew from TAG.json, running nothing")
    args = ap.parse_args(argv)
    if args.again:
        with open(os.path.join(RESULTS, f"{args.tag}.json")) as f:
            return write_markdown(json.load(f), args.tag)
    mergekit = ensure_mergekit()
    if mergekit is None:
        return 0
    streammerge = shutil.which("streammerge") or sys.exit("streammerge is not installed (pip install -e .)")
    rows = []
    load_before = os.getloadavg()
    for preset in args.presets:
        data = os.path.join(args.work, preset)
        if not os.path.exists(os.path.join(data, "expert-3")):
            subprocess.run(
                [
                    sys.executable,
                    os.path.join(ROOT, "tools", "make_toy_models.py"),
                    data,
                    "--preset",
                    preset,
                    "--experts",
                    "3",
                    "--shared",
                    "0.7",
                    "--shard-size",
                    "2GB",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        base = os.path.join(data, "base")
        experts = [os.path.join(data, f"expert-{i}") for i in (1, 2, 3)]
        for method in args.methods:
            # "ties-mergekit-order": mergekit's ties recipe, ours with `--param tie_break=mergekit` (its sort
            # of every task vector where ties straddle the threshold); plain "ties": our default, the
            # earliest tied entries (no sort)
            mk_method, extra = (
                (method.removesuffix("-mergekit-order"), ["--param", "tie_break=mergekit"])
                if method.endswith("-mergekit-order")
                else (method, [])
            )
            files = [
                os.path.join(d, f)
                for d in folders(mk_method, base, experts)
                for f in sorted(os.listdir(d))
                if f.endswith(".safetensors")
            ]
            floor = io_floor(files)  # of the models this method reads
            yaml_path = os.path.join(args.work, f"{preset}-{mk_method}.yaml")
            with open(yaml_path, "w") as f:
                f.write(recipe(mk_method, base, experts, args.density))
            runs: dict[str, list[dict]] = {"mergekit": [], "streammerge": []}
            outs = {
                "mergekit": os.path.join(args.work, "out-mergekit"),
                "streammerge": os.path.join(args.work, "out-streammerge"),
            }
            for pair in range(args.pairs):
                order = ["mergekit", "streammerge"] if pair % 2 == 0 else ["streammerge", "mergekit"]
                for tool in order:
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    drop_caches()
                    cmd = (
                        [mergekit, yaml_path, outs[tool], "--lazy-unpickle", "--no-cuda"]
                        if tool == "mergekit"
                        else [
                            streammerge,
                            "merge",
                            "--recipe",
                            yaml_path,
                            "--out",
                            outs[tool],
                            "--device",
                            "cpu",
                            "--quiet",
                            *extra,
                        ]
                    )
                    runs[tool].append(timed(cmd) | {"loadavg": os.getloadavg()[0]})
                    print(f"{preset} {method} pair {pair + 1} {tool}: {runs[tool][-1]}", flush=True)
            ratios = [s["wall"] / m["wall"] for s, m in zip(runs["streammerge"], runs["mergekit"])]
            rss = [s["peak_rss"] / m["peak_rss"] for s, m in zip(runs["streammerge"], runs["mergekit"])]
            row = {
                "preset": preset,
                "method": method,
                "runs": runs,
                "io_floor": floor,
                "median_wall_ratio": statistics.median(ratios),
                "median_rss_ratio": statistics.median(rss),
                "median_wall_over_cold_floor": statistics.median(r["wall"] for r in runs["streammerge"])
                / floor["cold"],
                "agreement": agreement(mk_method, base, experts, outs["streammerge"], outs["mergekit"]),
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": "python bench/vs_mergekit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mergekit": "0.1.5",
        "torch": torch.__version__,
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.tag}.json"), "w") as f:
        json.dump(doc, f, indent=2)
    return write_markdown(doc, args.tag)


def write_markdown(doc: dict, tag: str) -> int:
    """bench/results/TAG.md from the record (`--again TAG` writes it anew from TAG.json)."""
    rows, load_before = doc["rows"], doc["load_average_before"]
    lines = [
        "# streammerge beside mergekit 0.1.5",
        "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}; load average before "
        f"{load_before[0]:.2f}, after {doc['load_average_after'][0]:.2f}. Three bf16 experts + base (`--shared 0.7`), "
        f"the same mergekit YAML to both tools, alternating, page cache dropped before each run "
        f"({'yes' if rows and rows[0]['io_floor']['cache_dropped'] else 'not allowed here'}). Ratios are streammerge "
        "/ mergekit, medians over the pairs.",
        "",
        "| preset | method | mergekit wall (median) | streammerge wall (median) | wall ratio | RSS ratio | "
        "streammerge / cold I/O floor | cold / warm floor | agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mk = statistics.median(x["wall"] for x in r["runs"]["mergekit"])
        sm = statistics.median(x["wall"] for x in r["runs"]["streammerge"])
        agree = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["agreement"].items())
        lines.append(
            f"| {r['preset']} | {r['method']} | {mk:.1f} s | {sm:.1f} s | {r['median_wall_ratio']:.2f} | "
            f"{r['median_rss_ratio']:.2f} | "
            f"{r['median_wall_over_cold_floor']:.2f} | {r['io_floor']['cold']:.1f} s / {r['io_floor']['warm']:.1f} s "
            f"| {agree} |"
        )
    with open(os.path.join(RESULTS, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
