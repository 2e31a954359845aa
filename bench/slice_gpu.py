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


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from streammerge.cli import main; sys.exit(main())", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "slice-8b-gpu.json"))
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "8b-slice-x5"))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="8b-slice", help="another make_toy_models preset (a quicker, smaller check)")
    ap.add_argument("--experts", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
        t0 = time.perf_counter()
        done = subprocess.run(cli(*cmd), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        row: dict = {"command": "streammerge " + " ".join(cmd), "wall_seconds": round(wall, 1)}
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
        record["runs"][name] = row
        print(name, json.dumps(row), flush=True)
        save()
        subprocess.run(["rm", "-rf", out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
