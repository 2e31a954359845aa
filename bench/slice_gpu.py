#!/usr/bin/env python3
"""The laptop case measured on a GPU: five experts at Llama-3.1-8B shapes, merged on CUDA within
the laptop budgets (--max-gpu-memory 22GB --max-ram 12GB).

    python bench/slice_gpu.py --out bench/results/slice-8b-gpu.json

Inputs: `tools/make_toy_models.py --preset 8b-slice --experts 5 --shared 0.7` (Llama-3.1-8B's
embedding, lm_head and two of its layers at real shapes, bf16, 17.8 GB; made once under --work).
Each run is `streammerge merge --device cuda` in its own process with --memory-report: wall time,
peak anonymous RSS (sampled) against the plan, torch.cuda.max_memory_allocated against the plan.
The record is rewritten after every run, so a run cut short keeps what it measured. The time per
layer is projected to 32 layers: (merge time − embedding/lm_head share) is not separable from
outside, so the projection scales the whole slice by its parameter count (see `projection`).
The floor a merge is measured against (#27: TA and TIES within 1.5× of it): `cat` of the inputs
with the page cache dropped (cold) and in it (warm); with --cold each merge starts with the cache
dropped too (where the kernel allows it: recorded). --code DIR runs the merges with the package
of another checkout (a baseline, side by side: --tag names its rows), from that folder; each row
records the package it imported.
Runs from the project folder with no pip (a CUDA machine without network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches  # noqa: E402

RUNS = {
    "orthomerge-C+TA": ["--method", "orthomerge"],
    "orthomerge-C+TIES": ["--method", "orthomerge", "--residual-method", "ties"],
    "orthomerge-G": ["--method", "orthomerge", "--target", "global"],
    "ties": ["--method", "ties"],
    "task_arithmetic": ["--method", "task_arithmetic"],
}
# parameters of the slice and of Llama-3.1-8B (embedding + lm_head untied, 32 layers)
EMBED = 2 * 128256 * 4096
LAYER = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096


def jobs_for(experts: int) -> int:
    """Processes that make the inputs at once: each holds a few float32 copies of the 2.1 GB
    embedding (about 12 GB), and no more than the folders or half the cores."""
    import psutil

    return max(1, min(experts + 1, (os.cpu_count() or 2) // 2, psutil.virtual_memory().available // (12 * 10**9)))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from streammerge.cli import main; sys.exit(main())", *args]


def package_of(code: str, env: dict) -> str:
    """The folder of the streammerge package that a merge run from `code` imports (its command's
    module: a folder without it would fall through to an installed streammerge's)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os, streammerge.cli as m; print(os.path.dirname(os.path.abspath(m.__file__)))"],
        cwd=code, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "slice-8b-gpu.json"))
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "8b-slice-x5"))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="8b-slice", help="another make_toy_models preset (a quicker, smaller check)")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=0, help="processes making the inputs (default: as memory allows)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each merge")
    ap.add_argument("--floor", action="store_true", help="time cat of the inputs, cold and warm, first")
    ap.add_argument("--code", default=ROOT, help="the checkout whose package merges (default: this one)")
    ap.add_argument("--tag", default="", help="appended to each run's name in the record")
    args = ap.parse_args()
    args.work, args.out, code = os.path.abspath(args.work), os.path.abspath(args.out), os.path.abspath(args.code)
    # each merge runs from `code`: `python -c` puts its working folder first on the path, before
    # PYTHONPATH (run from this folder, as until 2026-12-05, every --code run merged with this checkout)
    env = dict(os.environ, PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))
    package = package_of(code, env)
    if package != os.path.join(code, "streammerge"):
        sys.exit(f"--code {args.code}: python run there imports {package}, not its streammerge/")
    import torch

    record: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/slice_gpu.py",
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "budgets": "--max-gpu-memory 22GB --max-ram 12GB",
        "runs": {},
    }

    if os.path.exists(args.out):  # what another call recorded (another --code, the floor) is kept
        with open(args.out) as f:
            record = json.load(f) | {k: v for k, v in record.items() if k != "runs"}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)

    n = args.experts
    if not os.path.exists(os.path.join(args.work, f"expert-{n}", "model.safetensors.index.json")):
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "make_toy_models.py"),
                args.work,
                "--preset",
                args.preset,
                "--experts",
                str(n),
                "--shard-size",
                "2GB",
                "--shared",
                "0.7",
                "--jobs",
                str(args.jobs or jobs_for(n)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        record["inputs_made_seconds"] = round(time.perf_counter() - t0, 1)
    record["inputs"] = (
        f"python tools/make_toy_models.py {os.path.relpath(args.work, ROOT)} --preset {args.preset} --experts {n} "
        "--shard-size 2GB --shared 0.7"
    )
    record["load_average"] = os.getloadavg()
    files = sorted(
        os.path.join(args.work, d, f)
        for d in ["base", *(f"expert-{i}" for i in range(1, n + 1))]
        for f in os.listdir(os.path.join(args.work, d))
        if f.endswith(".safetensors")
    )
    record["input_bytes"] = sum(os.path.getsize(f) for f in files)
    if args.floor:
        record["floor"] = {"cache_dropped": drop_caches()}
        for state in ("cold", "warm"):
            t0 = time.perf_counter()
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
            record["floor"][f"cat_{state}_seconds"] = round(time.perf_counter() - t0, 2)
        print("floor", json.dumps(record["floor"]), flush=True)
    save()
    for name in args.runs:
        out = os.path.join(args.work, f"out-{name}")
        subprocess.run(["rm", "-rf", out])
        report = out + "-memory.json"
        cmd = [
            "merge",
            "--quiet",
            "--device",
            args.device,
            "--max-gpu-memory",
            "22GB",
            "--max-ram",
            "12GB",
            "--base",
            os.path.join(args.work, "base"),
        ]
        for i in range(1, n + 1):
            cmd += ["--expert", os.path.join(args.work, f"expert-{i}")]
        cmd += [*RUNS[name], "--out", out, "--memory-report", report]
        dropped = drop_caches() if args.cold else False
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        done = subprocess.run(cli(*cmd), env=env, capture_output=True, text=True, cwd=code)
        wall = time.perf_counter() - t0
        row: dict = {
            "command": "streammerge " + " ".join(cmd),
            "code": os.path.relpath(code, ROOT),
            "package": package,
            "cache_dropped": dropped,
            "load_average": round(load, 2),
            "wall_seconds": round(wall, 1),
        }
        if done.returncode != 0:
            row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        else:
            mem = json.load(open(report))
            row |= {
                k: mem[k]
                for k in (
                    "seconds",
                    "measured_peak_ram",
                    "planned_peak_ram",
                    "measured_peak_gpu",
                    "planned_peak_gpu",
                    "read_throughput",
                )
                if k in mem
            }
            if args.preset == "8b-slice":
                row["projected_8b_minutes"] = round(mem["seconds"] * (EMBED + 32 * LAYER) / (EMBED + 2 * LAYER) / 60, 1)
        record["runs"][name + args.tag] = row
        print(name + args.tag, json.dumps(row), flush=True)
        save()
        subprocess.run(["rm", "-rf", out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
