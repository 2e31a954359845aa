#!/usr/bin/env python3
"""Merge the cached experts with every method and measure per-task accuracy (MiniLM-L6).

    python bench/quality/train_experts.py --seeds 0 1 2      # once (cached)
    python bench/quality/run_benchmark.py --seeds 0 1 2      # → bench/results/quality.{md,json}

For each expert family (OFT, LoRA, full fine-tune) and seed, the five experts of that family and
seed are merged by each configuration below with streammerge's Python API, the merged encoder is
loaded with transformers and every task is scored with its own expert's head. Hyper-parameters
are chosen on the validation split (the mean validation accuracy over the five tasks) from the
small grid written beside each configuration; the test split is scored once, for the chosen point.
Scale controls: task arithmetic at λ = 1/N and 1/√N; the Table-4 ablations of OrthoMerge
(average R, sequential product of R, average Q) beside its magnitude-corrected mean.
Normalized accuracy = merged accuracy / the task's own expert's accuracy (test), averaged.
OrthoMerge's residual methods take the parameters validation chose for them alone (same family
and seed); its rotation scale is chosen on the TA-residual row of each target and taken by the
TIES and TSV-M rows; the dense Table-4 ablations use the tuned TA residual too.
A merge that two rows share (TA at λ = 1/N and the grid's λ = 0.2; the magnitude-corrected
ablation and OrthoMerge-G + TA at scale 1) is made and scored once, and a per-unit memo of the
Procrustes solves (RotationMemo) spares the rows that rotate the same experts the same way.
Each (family, seed) runs in its own process with one torch thread, `--jobs` of them side by side
(more threads once fewer units than cores are left).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import CACHE, accuracy, expert_dir, model_folder, tokenised  # noqa: E402
from tasks import TASKS, build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = len(TASKS)
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 1.0]
SCALES = [0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def configs(family: str) -> list[tuple[str, str, dict, dict]]:
    """(label, method, fixed parameters, grid {parameter: values}) for one expert family.
    Grids: seed 0 of the first run chose the lower edge of TA's λ, TIES's density, Iso-C's α and
    the OFT rotation scale, so those grids reach lower; points never chosen there were dropped
    (TA λ 0.7, TIES density 0.5, ortho_svd threshold 0.3). #28: the spectral methods chose the top
    α = 1 in every dense curve, so their grids reach α = 3 (the TSV-M authors search that far), and
    OrthoMerge's scale runs 0.125–1.5 on OFT and 0.25–1.5 on dense experts."""
    rows = [
        ("task arithmetic", "task_arithmetic", {}, {"lambda": LAMBDAS}),
        ("TA λ = 1/N", "task_arithmetic", {"lambda": 1 / N}, {}),
        ("TA λ = 1/√N", "task_arithmetic", {"lambda": 1 / math.sqrt(N)}, {}),
        ("TIES", "ties", {}, {"density": [0.1, 0.2], "lambda": [0.3, 0.5, 1.0]}),
        ("DARE-TIES", "dare_ties", {}, {"lambda": [0.3, 0.5, 1.0]}),
        ("TSV-M", "tsv", {}, {"alpha": [0.25, 0.5, 1.0, 2.0, 3.0]}),
        ("Iso-C", "iso_c", {}, {"alpha": [0.25, 0.5, 1.0, 2.0, 3.0]}),
        ("Iso-CTS", "iso_cts", {}, {"alpha": [0.25, 0.5, 1.0, 2.0, 3.0]}),
        ("ortho_svd", "ortho_svd", {"threshold": 0.5}, {"alpha": [0.25, 0.5, 1.0, 2.0, 3.0]}),
        ("DO-Merging", "do_merging", {}, {"lambda": [0.3, 0.5, 1.0]}),
    ]
    if family == "oft":
        om = [("OrthoMerge (generators)", "orthomerge", {}, {"scale": SCALES})]
    else:
        # the residual method's parameters are those validation chose for it alone in this unit
        # (RESIDUAL_ROW); the rotation scale is chosen on the TA-residual row of each target and
        # taken by its TIES and TSV-M rows (SCALE_ROW)
        om = [
            (
                f"OrthoMerge-{t[0].upper()} + {r}",
                "orthomerge",
                {"target": t, "residual_method": m},
                {"scale": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]} if r == "TA" else {},
            )
            for t in ("global", "conflict")
            for r, m in (("TA", "task_arithmetic"), ("TIES", "ties"), ("TSV-M", "tsv"))
        ]
    ablations = [
        ("Table 4: average R", "orthomerge", {"rotation_merge": "average_r"}, {}),
        ("Table 4: product R", "orthomerge", {"rotation_merge": "product_r"}, {}),
        ("Table 4: average Q", "orthomerge", {"rotation_merge": "average_q"}, {}),
        ("Table 4: magnitude-corrected (OrthoMerge)", "orthomerge", {}, {}),
    ]
    if (
        family != "oft"
    ):  # on dense experts the ablations use the global target, as the paper's OFT merges rotate everything,
        # and the TA residual at the λ tuned for task arithmetic (the magnitude-corrected row is then
        # OrthoMerge-G + TA at scale 1, merged once)
        ablations = [
            (label, m, p | {"target": "global", "residual_method": "task_arithmetic"}, g)
            for label, m, p, g in ablations
        ]
    return rows + om + ablations


# OrthoMerge's residual merge runs with the parameters chosen on validation for that method alone
# (the row named here, same family and seed): tuning them again per rotation scale would triple
# the grid, and at their defaults (TIES λ 1, TSV-M α 1) the residual, not the rotation, decides.
RESIDUAL_ROW = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv": "TSV-M"}
SCALE_ROW = {f"OrthoMerge-{t} + {r}": f"OrthoMerge-{t} + TA" for t in "GC" for r in ("TIES", "TSV-M")}


def canonical(method: str, params: dict) -> str:
    """One key per distinct merge: the method's parameters with every default filled in, so that
    e.g. TA at λ = 1/N and the grid's λ = 0.2 are merged and scored once."""
    from streammerge.methods import build_params, get_method

    m, implied = get_method(method)
    return f"{m.name}:{build_params(m.params_type, implied | params, method)!r}"


class RotationMemo:
    """Within one (family, seed) unit, sixteen OrthoMerge merges rotate the same five experts onto
    the same base: every row with the global target solves the same Procrustes problems, and so
    does every row with the conflict target (the residual method, its parameters and the rotation
    scale act after R_i is found). The solves are deterministic, so this memo, keyed by the bytes
    of their inputs, returns a copy of what the solve returned the first time: the merges are
    byte-identical to unmemoized ones (checked by `--check-memo`), only faster."""

    def __init__(self) -> None:
        from streammerge.methods import orthomerge

        self.module = orthomerge
        self.solvers = {"procrustes": orthomerge.procrustes, "procrustes_from_cross": orthomerge.procrustes_from_cross}
        self.cache: dict[bytes, object] = {}
        self.hits = self.misses = 0

    @staticmethod
    def digest(*parts) -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=20)
        for part in parts:
            if isinstance(part, torch.Tensor):
                t = part.detach().contiguous().cpu()
                h.update(repr((t.dtype, tuple(t.shape))).encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(part).encode())
        return h.digest()

    @staticmethod
    def copy(rot):
        from streammerge.math.procrustes import SubspaceRotation

        return SubspaceRotation(
            rot.r_w.clone(), rot.q_w.clone(), None if rot.frame is None else rot.frame.clone(), rot.clipped_planes
        )

    def wrapped(self, name: str):
        solve = self.solvers[name]

        def memoized(*args, **kwargs):
            parts = [a.p if hasattr(a, "ap") else a for a in args] + [a.ap for a in args if hasattr(a, "ap")]
            key = self.digest(name, *parts, sorted(kwargs.items()))
            if key not in self.cache:
                self.misses += 1
                self.cache[key] = self.copy(solve(*args, **kwargs))
            else:
                self.hits += 1
            return self.copy(self.cache[key])

        return memoized

    def __enter__(self) -> "RotationMemo":
        for name in self.solvers:
            setattr(self.module, name, self.wrapped(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, solve in self.solvers.items():
            setattr(self.module, name, solve)
        self.cache.clear()


def expert_path(family: str, task: str, seed: int) -> str:
    d = expert_dir(family, task, seed)
    return os.path.join(d, "model" if family == "full" else "adapter")


def heads(family: str, seed: int, tasks: dict) -> dict:
    out = {}
    for task in TASKS:
        h = torch.nn.Linear(384, len(tasks[task]["labels"]))
        h.load_state_dict(torch.load(os.path.join(expert_dir(family, task, seed), "head.pt")))
        out[task] = h
    return out


def score(folder: str, hs: dict, data: dict, split: str) -> dict:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder)
    return {task: accuracy(encoder, hs[task], data[task][split]) for task in TASKS}


def merged(method: str, params: dict, family: str, seed: int, out: str, tasks: tuple[str, ...] = TASKS) -> float:
    from streammerge import Expert, Recipe, merge

    experts = tuple(Expert(expert_path(family, t, seed)) for t in tasks)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    merge(Recipe(method, model_folder(), experts, out, dict(params), seed=seed), device="cpu")
    return time.perf_counter() - start


def run_family(
    family: str, seed: int, data: dict, tasks: dict, work: str, only: set[str] | None, earlier: dict, threads: int = 1
) -> dict:
    """`earlier`: this unit's result from an earlier run (with --only: its base and expert scores
    are kept, and a residual row may come from it)."""
    hs = heads(family, seed, tasks)
    if only and "base" in earlier:
        result = {k: v for k, v in earlier.items() if k != "methods"} | {"methods": {}}
    else:
        own = {t: json.load(open(os.path.join(expert_dir(family, t, seed), "meta.json"))) for t in TASKS}
        # each expert alone, applied to the base by streammerge (an adapter's `linear` merge of one
        # expert is the adapter merged into the base) and scored on its own task
        alone = {}
        for t in TASKS:
            out = os.path.join(work, "alone")
            merged("linear", {}, family, seed, out, (t,))
            from transformers import AutoModel

            alone[t] = accuracy(AutoModel.from_pretrained(out), hs[t], data[t]["test"])
        multitask = None  # the multi-task adapter with its own heads: the upper bound
        if os.path.exists(os.path.join(expert_dir(family, "multitask", seed), "meta.json")):
            out = os.path.join(work, "multitask")
            merged("linear", {}, family, seed, out, ("multitask",))
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(out)
            own_heads = torch.load(os.path.join(expert_dir(family, "multitask", seed), "head.pt"))
            multitask = {}
            for t in TASKS:
                h = torch.nn.Linear(384, len(tasks[t]["labels"]))
                h.load_state_dict(own_heads[t])
                multitask[t] = accuracy(encoder, h, data[t]["test"])
        result = {
            "base": score(model_folder(), hs, data, "test"),
            "experts": alone,
            "multitask": multitask,
            "experts_as_trained": {t: own[t]["test_accuracy"] for t in TASKS},
            "expert_training_seconds": sum(own[t]["seconds"] for t in TASKS),
            "methods": {},
        }
    earlier = earlier.get("methods", {})
    seen: dict[str, dict] = {}  # canonical merge → {"val": ..., "test": ..., "folder": ...}
    for label, method, fixed, grid in configs(family):
        if only and label not in only:
            continue
        set_threads(threads)
        borrowed = []  # (row, what): parameters this row takes from another row's validation
        if method == "orthomerge" and "residual_method" in fixed:
            borrowed.append((RESIDUAL_ROW[fixed["residual_method"]], "residual parameters"))
        if label in SCALE_ROW:
            borrowed.append((SCALE_ROW[label], "rotation scale"))
        missing = None
        for row_label, what in borrowed:
            params = (result["methods"].get(row_label) or earlier.get(row_label, {})).get("params")
            if params is None:
                missing = f"no tuned {row_label} row to take the {what} from"
                break
            fixed = fixed | (
                {"residual": dict(params)} if what == "residual parameters" else {"scale": params["scale"]}
            )
        if missing:
            result["methods"][label] = {
                "error": missing,
                "method": method,
                "fixed": fixed,
                "grid": grid,
                "seconds": 0.0,
            }
            continue
        best: dict | None = None
        points = []
        keys = list(grid)
        started = time.perf_counter()
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            params = fixed | dict(zip(keys, values))
            key = canonical(method, params)
            if key not in seen:
                folder = os.path.join(work, f"m{len(seen)}")
                try:
                    merged(method, params, family, seed, folder)
                except Exception as exc:  # recorded: a method that cannot merge this family says why
                    best = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                    break
                seen[key] = {"folder": folder, "params": params, "method": method}
            if not keys:  # nothing to choose: the test split only
                best = {"params": {}, "key": key}
                break
            if "val" not in seen[key]:
                seen[key]["val"] = score(seen[key]["folder"], hs, data, "val")
            mean = statistics.fmean(seen[key]["val"].values())
            points.append({"params": dict(zip(keys, values)), "val_mean": mean})
            if best is None or mean > best["val_mean"]:  # ties: the first (smallest) grid point
                best = {"params": dict(zip(keys, values)), "val_mean": mean, "key": key}
        if best is not None and "error" not in best:
            chosen = seen[best.pop("key")]
            if "test" not in chosen:
                if not os.path.exists(chosen["folder"]):  # merged for an earlier row, not chosen there
                    merged(method, chosen["params"], family, seed, chosen["folder"])
                chosen["test"] = score(chosen["folder"], hs, data, "test")
            best["test"] = chosen["test"]
            if points:
                best["points"] = points
        best = (best or {}) | {
            "method": method,
            "fixed": fixed,
            "grid": grid,
            "seconds": round(time.perf_counter() - started, 1),
        }
        result["methods"][label] = best
        for merge_ in seen.values():  # scores are kept; 90 MB per merged model is not, except
            if merge_["method"] != "orthomerge":  # OrthoMerge's, which a later row may score again
                shutil.rmtree(merge_["folder"], ignore_errors=True)
        shown = (
            "error " + best["error"]
            if "error" in best
            else f"test mean {statistics.fmean(best['test'].values()):.4f} {best['params']}"
        )
        print(f"{family} s{seed} {label:45s} {shown} ({best['seconds']} s)", flush=True)
    return result


ACTIVE = None  # units running now, shared by the pool's processes (set by `share_active`)


def share_active(counter) -> None:
    global ACTIVE
    ACTIVE = counter


def set_threads(threads: int) -> None:
    """`threads`, or more when fewer units than cores are running (the last units of the run):
    merges do not depend on the thread count (one-thread factorisations, streammerge/math/lapack.py)."""
    active = max(1, ACTIVE.value) if ACTIVE is not None else 1
    torch.set_num_threads(max(threads, (os.cpu_count() or 1) // active))


def run_unit(unit: tuple) -> tuple[str, dict]:
    """One (family, seed) in its own process: tokenised data, a scratch folder, `threads` threads."""
    family, seed, threads, only, earlier = unit
    if ACTIVE is not None:
        with ACTIVE.get_lock():
            ACTIVE.value += 1
    try:
        return _run_unit(family, seed, threads, only, earlier)
    finally:
        if ACTIVE is not None:
            with ACTIVE.get_lock():
                ACTIVE.value -= 1


def _run_unit(family: str, seed: int, threads: int, only, earlier: dict) -> tuple[str, dict]:
    set_threads(threads)
    from transformers import AutoTokenizer

    tasks = build()
    data = tokenised(tasks, AutoTokenizer.from_pretrained(model_folder()))
    os.makedirs(os.path.join(CACHE, "merges"), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.join(CACHE, "merges"))  # its own: units run side by side
    try:
        with RotationMemo() as memo:
            result = run_family(family, seed, data, tasks, work, only, earlier, threads)
        print(f"{family} s{seed}: {memo.misses} Procrustes solves, {memo.hits} reused", flush=True)
        return f"{family}-s{seed}", result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_memo(family: str) -> int:
    """Merge OrthoMerge-G + TSV-M and OrthoMerge-C + TIES of seed 0 without the memo, then with it
    twice (the second from a warm memo): the output files must be byte-identical."""
    import hashlib

    def digest(folder: str) -> str:
        h = hashlib.sha256()
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                h.update(open(os.path.join(folder, f), "rb").read())
        return h.hexdigest()

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(dir=CACHE)
    failures = 0
    try:
        for params in (
            {"target": "global", "residual_method": "tsv", "scale": 0.5},
            {"target": "conflict", "residual_method": "ties", "scale": 1.0},
        ):
            plain = os.path.join(work, "plain")
            t_plain = merged("orthomerge", params, family, 0, plain)
            with RotationMemo() as memo:
                cold = os.path.join(work, "cold")
                t_cold = merged("orthomerge", params, family, 0, cold)
                warm = os.path.join(work, "warm")
                t_warm = merged("orthomerge", params, family, 0, warm)
            same = digest(plain) == digest(cold) == digest(warm)
            failures += not same
            print(
                f"{family} {params}: without memo {t_plain:.1f} s, cold memo {t_cold:.1f} s, warm memo {t_warm:.1f} s "
                f"({memo.misses} solves, {memo.hits} reused); outputs {'byte-identical' if same else 'DIFFER'}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def summarise(results: dict, families: list[str], seeds: list[int]) -> str:
    lines = []
    for family in families:
        runs = [results[f"{family}-s{s}"] for s in seeds if f"{family}-s{s}" in results]
        if not runs:
            continue
        lines += [
            f"\n### {family.upper() if family != 'full' else 'Full fine-tunes'} ({len(runs)} seed(s): "
            f"{', '.join(str(s) for s in seeds)})\n",
            "| | " + " | ".join(TASKS) + " | average | normalized |",
            "|---" * (len(TASKS) + 3) + "|",
        ]

        def row(label: str, per_seed: list[dict]) -> str:
            experts = [r["experts"] for r in runs]
            cells = []
            for t in TASKS:
                vals = [100 * p[t] for p in per_seed]
                cells.append(
                    f"{statistics.fmean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")
                )
            avg = [100 * statistics.fmean(p.values()) for p in per_seed]
            norm = [100 * statistics.fmean(p[t] / e[t] for t in TASKS) for p, e in zip(per_seed, experts)]
            sd = lambda v: f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""
            return (
                f"| {label} | "
                + " | ".join(cells)
                + f" | {statistics.fmean(avg):.1f}{sd(avg)} | {statistics.fmean(norm):.1f}{sd(norm)} |"
            )

        lines.append(row("base encoder + expert heads", [r["base"] for r in runs]))
        lines.append(row("individual experts (each on its task)", [r["experts"] for r in runs]))
        if all(r.get("multitask") for r in runs):
            lines.append(row("multi-task (upper bound, its own heads)", [r["multitask"] for r in runs]))
        for label in runs[0]["methods"]:
            per = [r["methods"][label] for r in runs if label in r["methods"]]
            if any("error" in p for p in per):
                lines.append(f"| {label} | " + " | ".join(["—"] * len(TASKS)) + f" | {per[0].get('error', '')} | |")
                continue
            shown = [p["params"] | ({"scale": p["fixed"]["scale"]} if label in SCALE_ROW else {}) for p in per]
            chosen = "; ".join(
                sorted(
                    {
                        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in q.items())
                        for q in shown
                    }
                    - {""}
                )
            )
            lines.append(row(label + (f" ({chosen})" if chosen else ""), [p["test"] for p in per]))
    return "\n".join(lines)


def headline(results: dict, seeds: list[int]) -> str:
    """Average test accuracy (%) per method and family, seeds averaged; — where not run."""
    families = [f for f in ("oft", "lora", "full") if any(f"{f}-s{s}" in results for s in seeds)]
    runs = {f: [results[f"{f}-s{s}"] for s in seeds if f"{f}-s{s}" in results] for f in families}

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")

    names = {"oft": "OFT", "lora": "LoRA", "full": "full"}
    lines = [
        "| average test accuracy (%) | " + " | ".join(names[f] for f in families) + " |",
        "|---" * (len(families) + 1) + "|",
    ]
    lines.append(
        "| base encoder + expert heads | "
        + " | ".join(cell([100 * statistics.fmean(r["base"].values()) for r in runs[f]]) for f in families)
        + " |"
    )
    lines.append(
        "| individual experts | "
        + " | ".join(cell([100 * statistics.fmean(r["experts"].values()) for r in runs[f]]) for f in families)
        + " |"
    )
    lines.append(
        "| multi-task (upper bound) | "
        + " | ".join(
            cell([100 * statistics.fmean(r["multitask"].values()) for r in runs[f] if r.get("multitask")])
            for f in families
        )
        + " |"
    )
    labels: list[str] = []
    for f in families:
        for label in runs[f][0]["methods"]:
            if label not in labels:
                labels.append(label)
    for label in labels:
        cells = []
        for f in families:
            per = [r["methods"][label] for r in runs[f] if label in r["methods"] and "test" in r["methods"][label]]
            cells.append(cell([100 * statistics.fmean(p["test"].values()) for p in per]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defaults_table(results: dict, seeds: list[int]) -> str:
    """Validation accuracy at each method's default parameters beside the best grid point (both
    averaged over seeds): where the default is far below, the default is poor on this benchmark."""
    lines = ["| validation accuracy (%): default → best (chosen) | OFT | LoRA | full |", "|---|---|---|---|"]
    labels: list[str] = []
    for key in results:
        labels += [label for label, m in results[key]["methods"].items() if "points" in m and label not in labels]
    for label in labels:
        cells = []
        for family in ("oft", "lora", "full"):
            at_default, at_best, chosen = [], [], []
            for seed in seeds:
                m = results.get(f"{family}-s{seed}", {}).get("methods", {}).get(label)
                if not m or "points" not in m:
                    continue
                default = canonical(m["method"], m["fixed"])
                hits = [
                    p["val_mean"] for p in m["points"] if canonical(m["method"], m["fixed"] | p["params"]) == default
                ]
                if hits:
                    at_default.append(hits[0])
                at_best.append(m["val_mean"])
                chosen.append(
                    ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["params"].items())
                )
            if not at_best:
                cells.append("—")
                continue
            d = f"{100 * statistics.fmean(at_default):.1f}" if len(at_default) == len(at_best) else "not in grid"
            cells.append(f"{d} → {100 * statistics.fmean(at_best):.1f} ({'; '.join(sorted(set(chosen)))})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def orthomerge_differences(results: dict, seeds: list[int]) -> str:
    """Each OrthoMerge row minus task arithmetic (tuned λ) and minus the best other method, in
    average test accuracy points, paired by seed: mean ± standard deviation of the differences."""
    lines = [
        "| OrthoMerge row − baseline, average test accuracy (points, paired by seed) | vs task arithmetic | vs its "
        "residual method alone | vs the best non-OrthoMerge method |",
        "|---|---|---|---|",
    ]
    residual_row = {"TA": "task arithmetic", "TIES": "TIES", "TSV-M": "TSV-M"}
    for family in ("oft", "lora", "full"):
        runs = [results[f"{family}-s{s}"] for s in seeds if f"{family}-s{s}" in results]
        if not runs:
            continue

        def avg(run: dict, label: str) -> float | None:
            m = run["methods"].get(label)
            return 100 * statistics.fmean(m["test"].values()) if m and "test" in m else None

        others = [label for label in runs[0]["methods"] if not label.startswith(("OrthoMerge", "Table 4"))]
        best = max(others, key=lambda label: statistics.fmean(a for r in runs if (a := avg(r, label)) is not None))
        rows = [
            label
            for label in runs[0]["methods"]
            if label.startswith("OrthoMerge") or label == "Table 4: magnitude-corrected (OrthoMerge)"
        ]
        for label in rows:
            cells = []
            own = residual_row.get(label.rsplit("+ ", 1)[1], "") if "+ " in label else "task arithmetic"
            for against in ("task arithmetic", own, best):
                d = [
                    avg(r, label) - avg(r, against)
                    for r in runs
                    if avg(r, label) is not None and avg(r, against) is not None
                ]  # type: ignore[operator]
                if not d:
                    cells.append("—")
                    continue
                cells.append(
                    f"{statistics.fmean(d):+.1f}"
                    + (f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else "")
                    + (f" ({against})" if against != "task arithmetic" else "")
                )
            lines.append(f"| {family.upper() if family != 'full' else 'full'}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(args) -> int:
    records = [json.load(open(p)) for p in [args.json, *args.also]]
    results: dict = {}
    for r in records:
        results |= r["results"]
    seeds = sorted({int(k.rsplit("-s", 1)[1]) for k in results})
    header = [
        "# Merge quality on MiniLM-L6: five conflicting tasks, three expert families",
        "",
        "Test accuracy (%) per task, its average, and normalized accuracy (merged / the task's own expert, averaged).",
        "Hyper-parameters chosen on the validation split from the grid in `bench/quality/run_benchmark.py` (chosen "
        "values",
        "in parentheses). Tasks, experts and protocol: `bench/quality/`. Runs:",
    ]
    for r in records:
        for h in r.get("history", [r]):
            load = ", ".join(f"{x:.1f}" for x in h["load_average"]) if h.get("load_average") else "not recorded"
            took = f", {h['seconds'] / 60:.1f} min" if h.get("seconds") else ""
            header.append(
                f"- `{h['command']}` — {h['date']}{took}, {r['machine']}, load average at its end {load}, torch "
                f"{r['torch']}" + (f": {h['note']}" if h.get("note") else "")
            )
    header += [
        "",
        "OrthoMerge's residual methods run with the parameters validation chose for that method alone (its row,",
        "same family and seed); the rotation scale is chosen on each target's TA-residual row and taken by its TIES",
        "and TSV-M rows; the dense Table-4 ablations use the tuned TA residual (their magnitude-corrected row is "
        "OrthoMerge-G + TA",
        "at scale 1).",
    ]
    with open(args.markdown, "w") as f:
        f.write(
            "\n".join(header)
            + "\n\n"
            + headline(results, seeds)
            + "\n"
            + summarise(results, ["oft", "lora", "full"], seeds)
            + "\n"
            + "\n### OrthoMerge against the baselines, paired by seed\n\n"
            + orthomerge_differences(results, seeds)
            + "\n"
            + "\n### Defaults against the grid\n\n"
            + defaults_table(results, seeds)
            + "\n"
        )
    print(f"written: {args.markdown}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["oft", "lora", "full"], choices=["oft", "lora", "full"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="run only these configuration labels (others kept from --json)")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "quality.json"))
    ap.add_argument(
        "--jobs", type=int, default=2, help="(family, seed) units run side by side, each in its own process"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per unit; more while fewer units than cores are left"
    )
    ap.add_argument("--markdown", help="write the tables of --json (and of any --also JSON) here, and run nothing")
    ap.add_argument(
        "--also", nargs="*", default=[], help="other result JSONs (runs split across processes) for --markdown"
    )
    ap.add_argument(
        "--check-memo",
        choices=["lora", "full"],
        help="check that the Procrustes memo leaves OrthoMerge's output byte-identical, and run nothing else",
    )
    args = ap.parse_args()
    if args.check_memo:
        return check_memo(args.check_memo)
    if args.markdown:
        return write_markdown(args)
    record = json.load(open(args.json)) if os.path.exists(args.json) else {}
    results = record.setdefault("results", {})
    only = set(args.only) if args.only else None
    units = []
    for seed in args.seeds:
        for family in args.families:
            if all(os.path.exists(os.path.join(expert_dir(family, t, seed), "meta.json")) for t in TASKS):
                units.append((family, seed, args.threads, only, results.get(f"{family}-s{seed}", {})))
            else:
                print(
                    f"{family} s{seed}: experts not all trained (bench/quality/train_experts.py --seeds {seed}); "
                    "skipped",
                    flush=True,
                )
    if not units:
        return 1
    # the slowest families first, so that the last unit to start is a short one
    units.sort(key=lambda u: ({"full": 0, "lora": 1, "oft": 2}[u[0]], u[1]))
    started = time.perf_counter()
    command = "python bench/quality/run_benchmark.py " + shlex.join(sys.argv[1:])
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, initializer=share_active, initargs=(context.Value("i", 0),)) as pool:
        for key, fresh in pool.imap_unordered(run_unit, units):
            if only and key in results:
                results[key]["methods"].update(fresh["methods"])
            else:
                results[key] = fresh
            record |= {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{os.cpu_count()} cores",
                "load_average": os.getloadavg(),
                "command": command,
                "torch": torch.__version__,
            }
            with open(args.json, "w") as f:  # after each unit: an interrupted run keeps what it finished
                json.dump(record, f, indent=2)
    record["seconds_this_run"] = round(time.perf_counter() - started)
    record.setdefault("history", []).append(
        {k: record[k] for k in ("command", "date", "load_average")} | {"seconds": record["seconds_this_run"]}
    )
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    seeds = sorted({int(k.rsplit("-s", 1)[1]) for k in results})
    print(summarise(results, args.families, seeds))
    print(f"{record['seconds_this_run']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
