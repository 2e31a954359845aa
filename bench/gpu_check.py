#!/usr/bin/env python3
"""The GPU check: what only a CUDA machine can show, in about ten minutes, into one file.

    bash bench/gpu_check.sh            # = python bench/gpu_check.py --out bench/results/gpu-check.json

Runs from the project folder with no network and no pip (PyTorch, safetensors, click, tqdm,
psutil and PyYAML must be there). Steps, each recorded with its figures:
 1. the environment (torch, device, memory);
 2. every method on toy models on the CPU and on CUDA: the largest difference, relative to the
    merged update (bf16 output: a few bf16 steps expected), and
    torch.cuda.max_memory_allocated against --max-gpu-memory;
 3. per-matrix OrthoMerge linear algebra at Llama-3.1-8B shapes (subspace build, Procrustes,
    Cayley) in float32 and float64;
 3b. OrthoMerge-G's lean wide path on one Llama-3-70B down_proj (8192×28672, five experts):
    peak GPU memory against its plan, time, projected to 80 layers (#29);
 4. one end-to-end OrthoMerge-C + TIES-residual merge of three synthetic 1.5 B experts;
 5. a projection of OrthoMerge-C + TIES over five 8B experts on this GPU: per-layer linear
    algebra from step 3 plus reading 6 × 16 GB at the read rate measured in step 4.
Without CUDA, steps 2–5 are skipped with a message (step 2 still runs its CPU side).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches, load_model as load  # noqa: E402

sys.path.insert(0, ROOT)
from streammerge import Expert, Recipe  # noqa: E402
from streammerge.engine import Merge, RunOptions  # noqa: E402

METHODS = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "scope": "model"}),
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("gta", {"sparsify": "magnitude_outliers", "consensus": "sum", "tie_break": "index"}),
    ("breadcrumbs_ties", {}),
    ("della", {}),
    ("slerp", {"t": 0.3}),
    ("nuslerp", {}),
    ("multislerp", {}),
    ("karcher", {}),
    ("model_stock", {}),
    ("sce", {}),
    ("nearswap", {"t": 0.5}),
    ("arcee_fusion", {}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("ortho_svd", {}),
    ("do_merging", {}),
    ("orthomerge", {"target": "global"}),
    ("orthomerge", {"target": "conflict"}),
    ("orthomerge", {"target": "conflict", "residual_method": "ties"}),
]
SHAPES_8B = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "embed/lm_head": (128256, 4096),
}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


EXPERT_COUNT = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}  # the methods that take a fixed number


def run_merge(
    base: str, experts: list[str], out: str, method: str, params: dict, device: str, max_gpu: int | None = None
) -> tuple[float, dict]:
    from streammerge.methods import get_method

    chosen = experts[: EXPERT_COUNT.get(method, len(experts))]
    weighted = "weight" in get_method(method)[0].expert_params
    recipe = Recipe(
        method,
        base,
        tuple(Expert(e, weight=1.0 / len(chosen) if weighted else None) for e in chosen),
        out,
        dict(params),
        seed=0,
    )
    merger = Merge(recipe, RunOptions(device=device, quiet=True, max_gpu_memory=max_gpu))
    try:
        start = time.perf_counter()
        report = merger.run()
        sync()
        return time.perf_counter() - start, {
            "read_throughput": report.read_throughput,
            "planned_gpu": merger.plan.peak_gpu,
        }
    finally:
        merger.close()


def toy(folder: str, *args: str) -> list[str]:
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_toy_models.py"), folder, *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if d.startswith("expert-")]


def step_numerics(work: str, cuda: bool) -> list[dict]:
    experts = toy(os.path.join(work, "toy"), "--preset", "small", "--experts", "3", "--shared", "0.7")
    base = os.path.join(work, "toy", "base")
    base_t = load(base)
    rows = []
    for method, params in METHODS:
        label = method + "".join(f" {k}={v}" for k, v in params.items())
        cpu_out = os.path.join(work, f"cpu-{len(rows)}")
        row: dict = {"method": label}
        try:
            row |= numerics_row(base, base_t, experts, work, cpu_out, method, params, cuda, len(rows))
        except Exception as exc:  # recorded, and the check goes on with the next method
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        log(f"  {label:40s} " + " ".join(f"{k}={v}" for k, v in row.items() if k != "method"))
    return rows


def numerics_row(
    base: str,
    base_t: dict,
    experts: list[str],
    work: str,
    cpu_out: str,
    method: str,
    params: dict,
    cuda: bool,
    index: int,
) -> dict:
    t_cpu, _ = run_merge(base, experts, cpu_out, method, params, "cpu")
    row = {"cpu_seconds": round(t_cpu, 2)}
    if cuda:
        budget = 2 * 10**9
        import gc

        gc.collect()  # earlier runs' tensors still waiting for collection would count below
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        gpu_out = os.path.join(work, f"gpu-{index}")
        t_gpu, info = run_merge(base, experts, gpu_out, method, params, "cuda", budget)
        a, b = load(cpu_out), load(gpu_out)
        worst = 0.0
        for name in a:
            update = float((a[name].float() - base_t[name].float()).norm()) or 1.0
            worst = max(worst, float((a[name].float() - b[name].float()).norm()) / update)
        row |= {
            "cuda_seconds": round(t_gpu, 2),
            "max_relative_difference": worst,
            "max_memory_allocated": torch.cuda.max_memory_allocated() - held,
            "max_gpu_memory": budget,
            "planned_gpu": info["planned_gpu"],
        }
    return row


def step_linalg(cuda: bool) -> list[dict]:
    from streammerge.math.cayley import cayley_consuming
    from streammerge.math.procrustes import SubspaceBuilder, procrustes

    rows = []
    device = torch.device("cuda")
    for label, (out_f, in_f) in SHAPES_8B.items():
        if label == "embed/lm_head":
            continue  # row blocks: costs like gate/up per 4096 columns, measured end to end in step 4
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device)
        d = torch.randn(out_f, 16, generator=g) @ torch.randn(16, in_f, generator=g)
        b = a + (d * (0.01 * float(a.norm()) / float(d.norm()))).to(device)
        for precision in (torch.float32, torch.float64):
            try:
                sync()
                t0 = time.perf_counter()
                builder = SubspaceBuilder(a, 1e-2, precision)
                builder.add(b - a)
                sub = builder.build()
                sync()
                t1 = time.perf_counter()
                rot = procrustes(b, sub)
                sync()
                t2 = time.perf_counter()
                q = rot.dense_q()
                cayley_consuming(q)
                sync()
                t3 = time.perf_counter()
                row = {
                    "shape": label,
                    "dims": [out_f, in_f],
                    "precision": str(precision).removeprefix("torch."),
                    "k": sub.k,
                    "build_s": round(t1 - t0, 3),
                    "procrustes_s": round(t2 - t1, 3),
                    "cayley_s": round(t3 - t2, 3),
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                }
                del builder, sub, rot, q
            except RuntimeError as exc:  # out of memory, say: recorded, not fatal
                row = {
                    "shape": label,
                    "dims": [out_f, in_f],
                    "precision": str(precision).removeprefix("torch."),
                    "error": str(exc).splitlines()[0],
                }
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            log(f"  {row}")
    return rows


def step_wide_70b() -> dict:
    """#29: OrthoMerge-G's lean wide path on one Llama-3-70B down_proj (8192×28672, five dense
    experts made on the GPU, float32): peak GPU memory above the inputs against the plan
    (orthomerge.memory), and the time, projected to 80 layers."""
    from streammerge.methods import TensorTask
    from streammerge.methods.orthomerge import OrthoMergeParams, lean_wide, memory, merge

    shape, n = (8192, 28672), 5
    params = OrthoMergeParams(target="global", precision="float32")
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        a = torch.randn(shape, generator=g, device="cuda") / math.sqrt(shape[1])
        experts = [a + 0.02 * torch.randn(shape, generator=g, device="cuda") / math.sqrt(shape[1]) for _ in range(n)]

        class Fresh(list):
            def __getitem__(self, i):
                return super().__getitem__(i).clone()

        sync()
        torch.cuda.reset_peak_memory_stats()
        inputs = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = merge(TensorTask("model.layers.0.mlp.down_proj.weight", a, Fresh(experts), (1.0,) * n), params)
        sync()
        seconds = time.perf_counter() - t0
        row = {
            "shape": list(shape),
            "experts": n,
            "lean_path": lean_wide(shape, n, params),
            "seconds": round(seconds, 1),
            "projected_80_layers_h": round(80 * seconds / 3600, 2),
            "peak_gpu_above_inputs": torch.cuda.max_memory_allocated() - inputs,
            "planned_work": memory("x", shape, n, params, 4).work,
            "planned_work_cuda": memory("x", shape, n, params, 4).on_gpu,
            "finite": bool(torch.isfinite(out).all()),
            "relative_update": float((out - a).norm() / a.norm()),
        }
        del a, experts, out
    except RuntimeError as exc:  # out of memory, say: recorded, not fatal
        row = {"shape": list(shape), "error": str(exc).splitlines()[0]}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def step_end_to_end(work: str) -> dict:
    experts = toy(
        os.path.join(work, "big"), "--preset", "1.5b", "--experts", "3", "--shared", "0.7", "--shard-size", "2GB"
    )
    base = os.path.join(work, "big", "base")
    torch.cuda.reset_peak_memory_stats()
    seconds, info = run_merge(
        base,
        experts,
        os.path.join(work, "big-out"),
        "orthomerge",
        {"target": "conflict", "residual_method": "ties"},
        "cuda",
        22 * 10**9,
    )
    inputs = sum(
        os.path.getsize(os.path.join(d, f))
        for d in [base, *experts]
        for f in os.listdir(d)
        if f.endswith(".safetensors")
    )
    files = [os.path.join(d, f) for d in [base, *experts] for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    dropped = drop_caches()  # the disk's own rate: the read-ahead asks the kernel (fadvise) and times nothing
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    read_seconds = time.perf_counter() - start
    row = {
        "preset": "1.5b",
        "experts": 3,
        "seconds": round(seconds, 1),
        "input_bytes": inputs,
        "cold_read_seconds": round(read_seconds, 2),
        "cache_dropped": dropped,
        "read_throughput": inputs / read_seconds if dropped else None,  # None: a warm read says nothing of the disk
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
    }
    log(f"  {row}")
    return row


def projection(linalg: list[dict], e2e: dict) -> dict:
    per = {r["shape"]: r for r in linalg if r.get("precision") == "float32" and "error" not in r}
    if not all(s in per for s in PER_LAYER):
        return {"note": "not every 8B shape ran in float32; no projection"}
    experts = 5
    layer = sum(
        count * (per[s]["build_s"] + experts * (per[s]["procrustes_s"]) + per[s]["cayley_s"])
        for s, count in PER_LAYER.items()
    )
    embed = 2 * (128256 / 14336) * (per["gate/up_proj"]["build_s"] + experts * per["gate/up_proj"]["procrustes_s"])
    rate = e2e.get("read_throughput") or 1e9
    read_s = 6 * 16.06e9 / rate * 4  # conflict target + TIES residual: about four reads of every expert
    linalg_s = 32 * layer + embed
    return {
        "layers": 32,
        "linalg_seconds": round(linalg_s),
        "read_seconds": round(read_s),
        "total_minutes": round((linalg_s + read_s) / 60, 1),
        "assumes": "float32 linear algebra; per-matrix times from step 3; reads at step 4's measured rate, about 4 "
        "passes",
    }


def step_tie_order() -> dict:
    """mergekit's TIES selection line on CUDA (issue #27: is its tie order a contract?): the same
    synthetic |τ| as bench/tie_order.py, argsort on the GPU against the earliest tied entries
    (`tie_break: index`) and against the CPU's argsort."""
    torch.manual_seed(0)
    base = (torch.randn(4096, 4096) * 0.02).to(torch.bfloat16)
    expert = (base.float() + torch.randn(4096, 4096) * 0.002).to(torch.bfloat16)
    w = (expert.float() - base.float()).abs().reshape(-1)
    k = int(0.2 * w.numel())

    def mask(order: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(w.numel(), dtype=torch.bool)
        m[order[:k].cpu()] = True
        return m

    cuda = mask(torch.argsort(w.cuda(), descending=True))
    earliest = mask(torch.argsort(w, descending=True, stable=True))
    cpu = mask(torch.argsort(w, descending=True))
    return {
        "kept": k,
        "cuda_vs_earliest_kept_differ": int((cuda != earliest).sum()) // 2,
        "cuda_vs_cpu_kept_differ": int((cuda != cpu).sum()) // 2,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu-check.json"))
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--skip-end-to-end", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    record: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "bash bench/gpu_check.sh",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "cuda": cuda,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        record |= {"device": props.name, "gpu_memory": props.total_memory}
    log(f"1. environment: {json.dumps(record)}")
    work = args.work or tempfile.mkdtemp(prefix="gpu-check-")

    def save() -> None:  # after every step, so a run cut short keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)

    try:
        log("2. every method, CPU against CUDA, toy models" + ("" if cuda else " (no CUDA device: CPU side only)"))
        record["numerics"] = step_numerics(work, cuda)
        save()
        if not cuda:
            log("3-5. skipped: no CUDA device")
        else:
            log("2b. mergekit's TIES tie order on CUDA")
            record["tie_order"] = step_tie_order()
            log(f"  {record['tie_order']}")
            save()
            log("3. OrthoMerge linear algebra at Llama-3.1-8B shapes")
            record["linalg_8b"] = step_linalg(cuda)
            save()
            log("3b. OrthoMerge's lean wide path: one Llama-3-70B down_proj, five experts")
            record["wide_70b"] = step_wide_70b()
            log(f"  {record['wide_70b']}")
            save()
            if not args.skip_end_to_end:
                log("4. end to end: OrthoMerge-C + TIES residual, three 1.5 B experts")
                record["end_to_end"] = step_end_to_end(work)
                log("5. projection: five 8B experts")
                record["projection_8b"] = projection(record["linalg_8b"], record["end_to_end"])
                log(f"  {record['projection_8b']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save()
    log(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
