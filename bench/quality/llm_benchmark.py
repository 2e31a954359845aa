#!/usr/bin/env python3
"""Merge the decoder-LLM benchmark's cached experts with every method and score them.

    python bench/quality/llm_train.py --seeds 0 1 2          # once (cached)
    python bench/quality/llm_benchmark.py --seeds 0 1 2      # → bench/results/quality-llm.json
    python bench/quality/llm_benchmark.py --markdown bench/results/quality-llm.md   # its tables
    python bench/quality/llm_benchmark.py --marks streammerge/quality_marks.py   # `streammerge methods`' marks
    python bench/quality/llm_benchmark.py --smoke            # the harness on a toy model (CI)

For each family (OFT and LoRA adapters of SmolLM2-135M-Instruct) and seed, the five task experts
are merged by each row below with streammerge's Python API and the merged model answers every
task's prompts greedily through its own LM head (exact match, llm_common.py). Each row's
parameters are chosen on the validation split (mean exact match over the five tasks, the first
VAL_PER_TASK prompts of each) from the grid beside it, on the first seed given (`--choose-on`): the
other seeds' units merge at the parameters it chose, with no validation pass (tuned once, as a user
would), and leave out the ABLATIONS rows. A grid over a parameter that scales the update (LINEAR)
merges once and scales. The test split is scored once per row and unit, at the chosen point, with
every prompt's correctness kept (for paired bootstrap intervals) and the perplexity of held-out
text; seed s scores every third test prompt of each task from the s-th (80 of 240), so three seeds
score all 1,200 test prompts once each. A choice on the edge of its grid is flagged (`edge`). Also
per unit: the base, each expert (on every task where the unit chooses: the interference table; on
its own task elsewhere), and the multi-task adapter of seed MULTITASK_SEED (the upper bound).
Sizing and its projected time: bench/quality/README.md.
OrthoMerge's residual methods take the parameters validation chose for them alone (same unit);
on LoRA its rotation scale is chosen on the TA-residual rows. Results accumulate in the JSON
(keyed by unit and row) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from llm_common import (  # noqa: E402
    PPL_WINDOWS,
    base_folder,
    exact_match,
    gguf_tokenizer,
    load_model,
    perplexity,
    tokenizer,
)
from llm_tasks import TASKS, build  # noqa: E402
from llm_train import expert_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results", "quality-llm.json")
# the spectral methods' α: up to 3, as the TSV-M authors search; OFT seed 0 chose 0.5 of 0.5–3
ALPHAS = [0.25, 0.5, 1.0, 2.0, 3.0]
LAMBDAS = [0.1, 0.15, 0.2, 0.3, 0.4, 0.7, 1.0, 1.5]  # OFT experts chose the lowest of 0.2–1.5 (seed 0)
SCALES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
VAL_PER_TASK = 40  # validation prompts per task a choice is made on (the first 40 of 80)
MULTITASK_SEED = 0  # one multi-task adapter: the upper bound in every seed's units
# Methods whose parameter scales the merged update (W − W₀ ∝ it; checked on toy models to float32
# round-off, and at every chosen point: `scaled_deviation`): a grid over it merges once, at 1, and
# its other points are W₀ + v·(W₁ − W₀); the chosen point is then merged directly for the test.
LINEAR = {
    "task_arithmetic": "lambda",
    "ties": "lambda",
    "dare_ties": "lambda",
    "tsv": "alpha",
    "iso_c": "alpha",
    "iso_cts": "alpha",
    "ortho_svd": "alpha",
    "do_merging": "lambda",
}
# rows merged on the choosing seed only (the paper's ablations and OrthoMerge's other variants):
# the other seeds' units merge the methods a user would choose between
ABLATIONS = {
    "Table 4: average R",
    "Table 4: product R",
    "Table 4: average Q",
    "Table 4: magnitude-corrected",
    "OrthoMerge-G + TA",
    "OrthoMerge-G + TSV-M",
    "OrthoMerge-C + TSV-M",
}


def configs(family: str) -> list[tuple[str, str, dict, dict]]:
    """(row, method, fixed parameters, grid) for one family."""
    rows = [
        ("task arithmetic", "task_arithmetic", {}, {"lambda": LAMBDAS}),
        # seed 0's OFT experts chose the lowest density of the first two grids (0.2, then 0.1; λ 0.7
        # both times) and DARE-TIES the lowest λ of 0.3–1.5 twice: widened downwards again
        ("TIES", "ties", {}, {"density": [0.05, 0.1, 0.2], "lambda": [0.5, 0.7, 1.0, 1.5]}),
        ("DARE-TIES", "dare_ties", {}, {"lambda": [0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0]}),
        ("TSV-M", "tsv", {}, {"alpha": ALPHAS}),
        ("Iso-C", "iso_c", {}, {"alpha": ALPHAS}),
        ("Iso-CTS", "iso_cts", {}, {"alpha": ALPHAS}),
        ("SVD Ortho-Merge", "ortho_svd", {}, {"alpha": ALPHAS}),
        ("DO-Merging", "do_merging", {}, {"lambda": [0.2, 0.3, 0.5, 1.0, 1.5]}),  # OFT s0 chose 0.5 of 0.5–1.5
        ("model_stock", "model_stock", {}, {}),
        ("karcher", "karcher", {}, {}),
    ]
    if family == "oft":
        rows += [
            ("OrthoMerge (generators)", "orthomerge", {}, {"scale": SCALES}),
            ("Table 4: average R", "orthomerge", {"rotation_merge": "average_r"}, {}),
            ("Table 4: product R", "orthomerge", {"rotation_merge": "product_r"}, {}),
            ("Table 4: average Q", "orthomerge", {"rotation_merge": "average_q"}, {}),
            ("Table 4: magnitude-corrected", "orthomerge", {}, {}),
        ]
    else:
        rows += [
            (f"OrthoMerge-{t[0].upper()} + {r}", "orthomerge", {"target": t, "residual_method": m},
             {"scale": [0.5, 1.0, 1.5]} if r == "TA" else {})
            for t in ("global", "conflict") for r, m in (("TA", "task_arithmetic"), ("TSV-M", "tsv"))
        ]  # fmt: skip
    return rows


RESIDUAL_ROW = {"task_arithmetic": "task arithmetic", "tsv": "TSV-M"}
SCALE_ROW = {"OrthoMerge-G + TSV-M": "OrthoMerge-G + TA", "OrthoMerge-C + TSV-M": "OrthoMerge-C + TA"}


def experts_of(family: str, seed: int, tasks=TASKS) -> tuple[str, ...]:
    return tuple(os.path.join(expert_dir(family, t, seed), "adapter") for t in tasks)


def merge_to(
    method: str, params: dict, experts: tuple[str, ...], out: str, base: str, seed: int, report: str | None = None
) -> float:
    """Merge into `out` (anew); `report`: also write streammerge's diagnostics (merge --report) there."""
    from streammerge import Expert, Recipe
    from streammerge.engine import Merge, RunOptions

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    recipe = Recipe(method, base, tuple(Expert(e) for e in experts), out, dict(params), seed=seed)
    merger = Merge(recipe, RunOptions(device="cpu", quiet=True, report=report))
    try:
        merger.run()
    finally:
        merger.close()
    return time.perf_counter() - start


def rotation_summary(report: str) -> dict:
    """How far OrthoMerge's merged rotations move (from its --report), over the tensors it could
    rotate: how many it did rotate; on dense experts the mean share of the update that is rotation
    (0: the rotation did nothing and the row is its residual method); on OFT experts (generators
    merged, the update all rotation) ‖R* − I‖ against the experts' mean ‖R_i − I‖; the mean norm of
    the merged generator Q* (where the rule forms one) and of the whole update W − W₀."""
    tensors = json.load(open(report))["tensors"].values()
    rotated = [t for t in tensors if "rotation_share" in t or "rotation_distance" in t]

    def mean(key: str, of=lambda v: v) -> float | None:
        values = [of(t[key]) for t in rotated if t.get(key) is not None]
        return statistics.fmean(values) if values else None

    return {
        "tensors_rotated": sum(
            1 for t in rotated if t.get("rotation_share", 0) > 0 or t.get("rotation_distance", 0) > 0
        ),
        "tensors": len(rotated),
        "rotation_share_mean": mean("rotation_share"),
        "rotation_distance_mean": mean("rotation_distance"),
        "expert_rotation_distance_mean": mean("expert_rotation_distances", statistics.fmean),
        "merged_generator_norm_mean": mean("merged_generator_norm"),
        "expert_generator_norm_mean": mean("generator_norms", statistics.fmean),
        "update_norm_mean": mean("update_norm"),
    }


def scaled(base: dict, unit: str, v: float, out: str) -> None:
    """The model W₀ + v·(W₁ − W₀) in `out`, W₁ the merge in `unit` (its files otherwise copied)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(unit, out)
    for name in os.listdir(unit):
        if name.endswith(".safetensors"):
            merged = load_file(os.path.join(unit, name))
            for k, w in merged.items():
                if w.is_floating_point():
                    merged[k] = (base[k].float() + v * (w.float() - base[k].float())).to(w.dtype)
            save_file(merged, os.path.join(out, name), metadata={"format": "pt"})


def load_tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return {k: v for n in files for k, v in load_file(os.path.join(folder, n)).items()}


def deviation(base: dict, a: str, b: str) -> float:
    """max over tensors of ‖A − B‖ / ‖B − W₀‖: how far a direct merge is from its scaled twin."""
    ta, tb = load_tensors(a), load_tensors(b)
    worst = 0.0
    for k, w in tb.items():
        if w.is_floating_point():
            update = float((w.float() - base[k].float()).norm())
            diff = float((ta[k].float() - w.float()).norm())
            worst = max(worst, diff / update if update > 0 else diff)
    return worst


def score(folder: str, tok, data: dict, split: str, ppl: bool = False, tasks=TASKS) -> dict:
    model = load_model(folder)
    out = {"correct": {t: "".join("1" if ok else "0" for ok in exact_match(model, tok, data[t][split])) for t in tasks}}
    out["accuracy"] = {t: c.count("1") / len(c) for t, c in out["correct"].items()}
    out["mean"] = statistics.fmean(out["accuracy"].values())
    if ppl:
        out["perplexity"] = perplexity(model, tok)
    return out


SEEDS_PER_TEST = 3  # seed s scores test prompts s, s + 3, s + 6, ... of each task


def test_slice(data: dict, seed: int) -> dict:
    """This seed's share of each task's test prompts (strided: the label balance is kept)."""
    return {
        t: {"val": d["val"][:VAL_PER_TASK], "test": d["test"][seed % SEEDS_PER_TEST :: SEEDS_PER_TEST]}
        for t, d in data.items()
    }


# what a recorded unit was measured with: a unit recorded otherwise is measured again
PROTOCOL = {"val_per_task": VAL_PER_TASK, "perplexity_windows": PPL_WINDOWS, "multitask_seed": MULTITASK_SEED}


def run_unit(
    family: str,
    seed: int,
    data: dict,
    tok,
    work: str,
    done: dict,
    save,
    chosen: dict | None = None,
    base: str | None = None,
    experts: tuple[str, ...] | None = None,
    multitask: str | None = None,
    rows: list | None = None,
) -> dict:
    """One (family, seed): `chosen` is the unit whose validation choices this one reuses (None:
    choose here); `base`, `experts`, `multitask` and `rows` default to the cached SmolLM2 ones."""
    base = base or base_folder()
    experts = experts or experts_of(family, seed)
    multitask = multitask or os.path.join(expert_dir("multitask", "all", MULTITASK_SEED), "adapter")
    data = test_slice(data, seed)
    key = f"{family}-s{seed}"
    if done.get(key, {}).get("protocol") != PROTOCOL:
        done[key] = {"family": family, "seed": seed, "rows": {}, "protocol": PROTOCOL}
    unit = done[key]
    unit["test_prompts"] = sum(len(d["test"]) for d in data.values())
    base_tensors: dict = {}
    if "base" not in unit:
        unit["base"] = score(base, tok, data, "test", ppl=True)
        save()
    if "experts" not in unit:  # each expert alone (its adapter merged into the base): on every task
        unit["experts"] = {}  # where this unit chooses (the interference table), else on its own
        for t, path in zip(TASKS, experts):
            out = os.path.join(work, "alone")
            merge_to("linear", {}, (path,), out, base, seed)
            unit["experts"][t] = score(out, tok, data, "test", tasks=TASKS if chosen is None else (t,))
        save()
    if "multitask" not in unit:
        out = os.path.join(work, "multitask")
        merge_to("linear", {}, (multitask,), out, base, seed)
        unit["multitask"] = score(out, tok, data, "test", ppl=True)
        save()
    for label, method, fixed, grid in rows or configs(family):
        if chosen is not None:  # tuned on another seed: one merge at its choice
            if label in ABLATIONS:
                continue
            grid = {k: [v] for k, v in chosen["rows"][label]["params"].items()}
        borrowed = [(RESIDUAL_ROW[fixed["residual_method"]], "residual")] if "residual_method" in fixed else []
        borrowed += [(SCALE_ROW[label], "scale")] if label in SCALE_ROW else []
        for row, key in borrowed:
            picked = unit["rows"][row]["params"]
            fixed = fixed | ({"residual": dict(picked)} if key == "residual" else {"scale": picked["scale"]})
        done_row = unit["rows"].get(label)
        if (
            done_row is not None
            and done_row["fixed"] == fixed
            and (
                done_row["params"] == chosen["rows"][label]["params"]
                if chosen is not None
                else done_row["grid"] == grid
            )
        ):
            continue  # one chosen on another grid, from another choice or borrowing other values is merged again
        started, points, best = time.perf_counter(), [], None
        keys = list(grid)
        points_n = math.prod(len(grid[k]) for k in keys)
        # OrthoMerge's diagnostics (--report) come with the merge where there is one point, else
        # with the chosen point merged again
        report = os.path.join(work, "report.json") if method == "orthomerge" else None
        lin = LINEAR.get(method)
        lin = lin if chosen is None and lin in grid and len(grid[lin]) > 1 else None
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            params = dict(zip(keys, values))
            folder = os.path.join(work, "m-" + "-".join(map(str, values)))
            if lin is None:
                merge_seconds = merge_to(method, fixed | params, experts, folder, base, seed,
                                         report if points_n == 1 else None)  # fmt: skip
            else:  # one merge at 1 per value of the other parameters; this point scaled from it
                one = os.path.join(work, "m-one-" + "-".join(str(v) for k, v in params.items() if k != lin))
                merge_seconds = 0.0
                if not os.path.exists(one):
                    merge_seconds = merge_to(method, fixed | params | {lin: 1.0}, experts, one, base, seed)
                base_tensors = base_tensors or load_tensors(base)
                scaled(base_tensors, one, params[lin], folder)
            val = score(folder, tok, data, "val") if chosen is None and keys else {"mean": 0.0}
            points.append({"params": params, "val_mean": val["mean"], "merge_seconds": round(merge_seconds, 1)})
            if best is None or val["mean"] > best[0]:  # ties: the first (smallest) point
                best = (val["mean"], params, folder)
        _, params, folder = best  # type: ignore[misc]
        edge = [k for k in keys if len(grid[k]) > 1 and params[k] in (grid[k][0], grid[k][-1])]
        if chosen is not None:
            edge, grid, points = chosen["rows"][label]["edge"], chosen["rows"][label]["grid"], []
        result = {"method": method, "fixed": fixed, "grid": grid, "params": params, "edge": edge, "points": points}
        result["chosen_on"] = seed if chosen is None else chosen["seed"]
        if lin is not None:  # the test scores the chosen point merged directly
            direct = os.path.join(work, "m-direct")
            merge_to(method, fixed | params, experts, direct, base, seed)
            result["scaled_deviation"] = deviation(base_tensors, direct, folder)
            folder = direct
        result |= score(folder, tok, data, "test", ppl=True)
        if report is not None:
            if points_n > 1:
                merge_to(method, fixed | params, experts, os.path.join(work, "m-report"), base, seed, report)
            result["rotation"] = rotation_summary(report)
        result["seconds"] = round(time.perf_counter() - started, 1)
        for p in os.listdir(work):
            if p.startswith("m-"):
                shutil.rmtree(os.path.join(work, p), ignore_errors=True)
        unit["rows"][label] = result
        save()
        print(f"{family} s{seed} {label:32s} test {result['mean']:.4f} {params} edge={edge} ({result['seconds']} s)",
              flush=True)  # fmt: skip
    return unit


def bootstrap(a: str, b: str, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over paired prompts (strings of 0/1), and its 95 % paired bootstrap interval."""
    x = torch.tensor([int(c) for c in a], dtype=torch.float32) - torch.tensor([int(c) for c in b], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (draws, len(x)), generator=g)
    means = x[idx].mean(dim=1).sort().values
    return float(x.mean()), float(means[int(0.025 * draws)]), float(means[int(0.975 * draws) - 1])


def joined(result: dict) -> str:
    return "".join(result["correct"][t] for t in TASKS)


def paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """Two rows' results (unit key → result) over the units both have: mean difference a − b over
    their (seed, prompt) pairs, its 95 % interval, prompts."""
    common = [k for k in a if k in b]
    x = "".join(joined(a[k]) for k in common)
    return (*bootstrap(x, "".join(joined(b[k]) for k in common)), len(x))


def versus_ta(doc: dict, family: str, label: str) -> tuple[float, float, float, int] | None:
    """The row against task arithmetic in this family (None for task arithmetic itself)."""
    if label == "task arithmetic":
        return None

    def row(name: str) -> dict:
        return {
            k: u["rows"][name] for k, u in doc["units"].items() if u["family"] == family and name in u.get("rows", {})
        }

    a, ta = row(label), row("task arithmetic")
    return paired(a, ta) if any(k in ta for k in a) else None


def marks(doc: dict) -> str:
    """streammerge/quality_marks.py: each measured row against task arithmetic, per method, for
    `streammerge methods` ('lost' or 'won' where the interval excludes 0, else 'level'; TA: task
    arithmetic)."""
    found: dict[str, list[str]] = {}
    for family in ("oft", "lora"):
        labels = {label: r["method"] for u in doc["units"].values() if u["family"] == family
                  for label, r in u.get("rows", {}).items()}  # fmt: skip
        for label, method in labels.items():
            vs = versus_ta(doc, family, label)
            if vs is None:
                continue
            m, lo, hi, n = vs
            verdict = "lost to" if hi < 0 else "won over" if lo > 0 else "level with"
            found.setdefault(method, []).append(
                f"{FAMILY[family]} adapters, {label}: {verdict} TA, {100 * m:+.1f} points "
                f"(95 % CI {100 * lo:+.1f}, {100 * hi:+.1f}; {n} prompts)"
            )
    body = "".join(f"    {json.dumps(m)}: [\n" + "".join(f"        {json.dumps(line, ensure_ascii=False)},\n"
                   for line in found[m]) + "    ],\n" for m in sorted(found))  # fmt: skip
    return (
        '"""What the decoder-LLM quality benchmark (SmolLM2-135M-Instruct, five tasks, LoRA and OFT experts)\n'
        "measured for each method against task arithmetic, shown by `streammerge methods`. Generated from\n"
        "bench/results/quality-llm.json by `python bench/quality/llm_benchmark.py --marks\n"
        'streammerge/quality_marks.py` (a test regenerates it and compares); not edited by hand."""\n\n'
        'SOURCE = "bench/results/quality-llm.md"\n'
        f"MARKS: dict[str, list[str]] = {{\n{body}}}\n"
    )


FAMILY = {"oft": "OFT", "lora": "LoRA"}
README_BEGIN = "<!-- quality-llm: generated by `python bench/quality/llm_benchmark.py --readme README.md` -->"
README_END = "<!-- /quality-llm -->"


def readme_tables(doc: dict) -> str:
    """README's table: the rows a user chooses between (no ablations), test exact match over every
    seed's prompts and the difference from task arithmetic, one column pair per family."""
    families = [f for f in ("oft", "lora") if any(u["family"] == f and u.get("rows") for u in doc["units"].values())]
    units = {f: [u for u in doc["units"].values() if u["family"] == f and u.get("rows")] for f in families}
    labels: list[str] = []
    for f in families:
        labels += [label for label in units[f][0]["rows"] if label not in ABLATIONS and label not in labels]

    def rate(results: list[dict]) -> str:
        correct = "".join(joined(r) for r in results)
        return f"{100 * correct.count('1') / len(correct):.1f} %" if correct else "—"

    def cells(label: str) -> list[str]:
        out = []
        for f in families:
            if label in ("base", "multitask"):
                out += [rate([u[label] for u in units[f]]), ""]
                continue
            rs = [u["rows"][label] for u in units[f] if label in u["rows"]]
            vs = versus_ta(doc, f, label)
            seeds = f" ({len(rs)} seed)" if rs and len(rs) < len(units[f]) else ""
            out += [
                rate(rs) + seeds,
                "" if vs is None else f"{100 * vs[0]:+.1f} ({100 * vs[1]:+.1f}, {100 * vs[2]:+.1f})",
            ]
        return out

    described = "; ".join(
        f"{FAMILY[f]}: seeds {', '.join(str(u['seed']) for u in units[f])}, {sum(u['test_prompts'] for u in units[f])} "
        "test prompts"
        for f in families
    )
    head = " | ".join(f"{FAMILY[f]}: exact match | {FAMILY[f]}: vs task arithmetic, points (95 % CI)" for f in families)
    lines = [README_BEGIN, "", f"Test exact match and paired difference from task arithmetic ({described}):", "",
             f"| method | {head} |", "|---|" + "---|" * (2 * len(families))]  # fmt: skip
    names = {"base": "base model", "multitask": "multi-task adapter (upper bound)"}
    for label in ["base", "multitask"] + labels:
        lines.append(f"| {names.get(label, label)} | " + " | ".join(cells(label)) + " |")
    return "\n".join(lines + ["", README_END])


def with_readme_tables(text: str, doc: dict) -> str:
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + readme_tables(doc) + text[end:]


def markdown(doc: dict) -> list[str]:
    lines = ["# Merge quality on a decoder LLM (SmolLM2-135M-Instruct)", "", f"`{doc.get('command', '')}`", "",
             "Each row's parameters were chosen on the validation split (mean exact match over the five tasks) "
             "with the experts of the seed in `chosen_on` and reused for the other seeds; seed s scores every "
             "third test prompt of each task from the s-th, so the seeds together score each test prompt once. "
             "Intervals: paired bootstrap over every (seed, prompt) pair the two rows share, 2,000 draws. "
             "'of experts': each task's accuracy over its own expert's, 'of multitask': the mean over the "
             "multi-task adapter's (normalized accuracy). 'vs best other': against the row with the highest "
             "mean other than this one.", ""]  # fmt: skip
    for family in ("oft", "lora"):
        units = [u for u in doc["units"].values() if u["family"] == family and u.get("rows")]
        if not units:
            continue
        lines += [f"## {family.upper()} experts ({len(units)} seed(s))", "",
                  "| row | seeds | " + " | ".join(TASKS) + " | mean | of experts | of multitask | vs TA (95 % CI) "
                  "| vs best other (95 % CI) | perplexity | chosen | edge |",
                  "|---|---|" + "---|" * (len(TASKS) + 8)]  # fmt: skip

        def of(label: str) -> dict:  # unit key → that unit's result for this row
            fixed = label in ("base", "multitask")
            return {
                k: u[label] if fixed else u["rows"][label]
                for k, u in doc["units"].items()
                if u in units and (fixed or label in u["rows"])
            }

        def versus(a: dict, b: dict) -> str:
            m, lo, hi, _ = paired(a, b)
            return f"{m:+.3f} ({lo:+.3f}, {hi:+.3f})"

        methods = list(units[0]["rows"])
        for label in ["base", "multitask"] + methods:
            rs = of(label)
            if not rs:
                continue
            acc = [statistics.fmean(r["accuracy"][t] for r in rs.values()) for t in TASKS]
            # normalized accuracy: each task against its own expert (where that scored above 0), and the
            # mean against the multi-task adapter's, per unit, averaged
            own = [r["accuracy"][t] / doc["units"][k]["experts"][t]["accuracy"][t] for k, r in rs.items()
                   for t in doc["units"][k]["experts"] if doc["units"][k]["experts"][t]["accuracy"][t] > 0]  # fmt: skip
            upper = [r["mean"] / doc["units"][k]["multitask"]["mean"] for k, r in rs.items()
                     if doc["units"][k]["multitask"]["mean"] > 0]  # fmt: skip
            ta = of("task arithmetic")
            vs_ta = versus(rs, ta) if ta and label not in ("task arithmetic", "base", "multitask") else ""
            # the best other row over this row's units (one that has them all), so that a row of the
            # choosing seed only is not compared with a mean that other seeds pulled down
            others = [b for b in methods if b != label and set(rs) <= set(of(b))]
            best = max(others, key=lambda b: statistics.fmean(of(b)[k]["mean"] for k in rs), default=None)
            vs_best = f"{best}: {versus(rs, of(best))}" if best and label in methods else ""
            ppl = statistics.fmean(r.get("perplexity", float("nan")) for r in rs.values())
            method_row = label not in ("base", "multitask")
            chosen = "; ".join(json.dumps(r.get("params", {})) for r in rs.values()) if method_row else ""
            edge = "; ".join(",".join(r.get("edge", [])) for r in rs.values()) if method_row else ""
            cells = [f"{a:.3f}" for a in acc] + [f"{statistics.fmean(acc):.3f}",
                     f"{statistics.fmean(own):.3f}" if own else "—", f"{statistics.fmean(upper):.3f}" if upper else "—",
                     vs_ta, vs_best, f"{ppl:.2f}", chosen, edge]  # fmt: skip
            lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
        rotated = [label for label in units[0]["rows"] if "rotation" in units[0]["rows"][label]]
        if rotated:
            lines += ["", "How far OrthoMerge's merged rotations move (its --report, means over the seeds): tensors "
                      "rotated of those it could rotate; on dense experts the share of the update that is rotation "
                      "(0: the row is its residual method); on OFT experts, where the update is all rotation, "
                      "‖R* − I‖ over the experts' mean ‖R_i − I‖ (0: the merge cancelled the rotations); the merged "
                      "generator's norm ‖Q*‖ over the experts' mean ‖Q_i‖ (Frobenius, per tensor):", "",
                      "| row | rotated | rotation share | ‖R* − I‖ / ‖R_i − I‖ | ‖Q*‖ | ‖Q*‖ / ‖Q_i‖ |",
                      "|---|---|---|---|---|---|"]  # fmt: skip

            def ratio_of(rs: list, a: str, b: str | None = None, digits: str = ".3f") -> str:
                pairs = [(r.get(a), r.get(b) if b else 1.0) for r in rs]
                values = [x / y for x, y in pairs if x is not None and y]
                return format(statistics.fmean(values), digits) if values else "—"

            for label in rotated:
                rs = [u["rows"][label]["rotation"] for u in units if "rotation" in u["rows"].get(label, {})]
                cells = [f"{rs[0]['tensors_rotated']}/{rs[0]['tensors']}", ratio_of(rs, "rotation_share_mean"),
                         ratio_of(rs, "rotation_distance_mean", "expert_rotation_distance_mean"),
                         ratio_of(rs, "merged_generator_norm_mean", digits=".3g"),
                         ratio_of(rs, "merged_generator_norm_mean", "expert_generator_norm_mean")]  # fmt: skip
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Each expert alone (rows) on every task (columns), test exact match:", "",
                  "| expert | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]  # fmt: skip
        full = [u for u in units if all(len(e["accuracy"]) == len(TASKS) for e in u["experts"].values())]
        for t in full[0]["experts"] if full else []:  # every task's expert (the smoke test's toy has two)
            cells = [statistics.fmean(u["experts"][t]["accuracy"][c] for u in full) for c in TASKS]
            lines.append(f"| {t} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
        lines.append("")
    return lines


def smoke(work: str) -> None:
    """The harness end to end on a toy Llama with random-token tasks: two adapters, two rows."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = os.path.join(work, "base")
    tok = gguf_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    tok = tokenizer(base)
    rows = {t: [(f"{t} {i}\nAnswer:", "yes") for i in range(6)] for t in TASKS}
    data = {t: {"val": rows[t][:2], "test": rows[t]} for t in TASKS}
    adapters = []
    for i in range(2):
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base), config)
        adapters.append(os.path.join(work, f"a{i}"))
        model.save_pretrained(adapters[-1])
    table = [
        ("task arithmetic", "task_arithmetic", {}, {"lambda": [0.5, 1.0]}),
        ("TIES", "ties", {}, {"density": [0.5]}),
        (
            "OrthoMerge-G + TA",
            "orthomerge",
            {"target": "global", "residual_method": "task_arithmetic"},
            {"scale": [1.0]},
        ),
    ]
    done: dict = {}
    for seed in (0, 1):  # seed 1 reuses seed 0's choices
        chosen = done["lora-s0"] if seed else None
        unit = run_unit(
            "lora", seed, data, tok, work, done, lambda: None, chosen, base, tuple(adapters), adapters[0], table
        )
        assert unit["test_prompts"] == 2 * len(TASKS)  # every third of six prompts per task
        for label, row in unit["rows"].items():
            assert set(row["accuracy"]) == set(TASKS) and all(len(c) == 2 for c in row["correct"].values())
            assert row["chosen_on"] == 0 and row["params"] == done["lora-s0"]["rows"][label]["params"]
            assert len(row["points"]) == (
                0 if seed else len(table[0][3]["lambda"]) if label == "task arithmetic" else 1
            )
        # the expert table on every task where the unit chooses, else each expert on its own task
        assert [len(e["accuracy"]) for e in unit["experts"].values()] == [len(TASKS) if seed == 0 else 1] * 2
        if seed == 0:
            # λ's grid: one merge, the other point scaled; the chosen one merged directly agrees
            assert unit["rows"]["task arithmetic"]["scaled_deviation"] < 1e-4, unit["rows"]["task arithmetic"]
            rotation = unit["rows"]["OrthoMerge-G + TA"]["rotation"]
            assert rotation["tensors"] > 0 and 0 < rotation["rotation_share_mean"] < 1, rotation
        else:
            assert "OrthoMerge-G + TA" not in unit["rows"]  # an ablation: on the choosing seed only
    # resumed: rows of the same grids are kept (the same objects); a changed grid merges that row again
    before = dict(done["lora-s0"]["rows"])
    table[1] = ("TIES", "ties", {}, {"density": [0.5, 0.7]})
    after = run_unit("lora", 0, data, tok, work, done, lambda: None, None, base, tuple(adapters), adapters[0], table)
    assert after["rows"]["TIES"] is not before["TIES"] and len(after["rows"]["TIES"]["points"]) == 2
    assert all(after["rows"][k] is before[k] for k in before if k != "TIES")
    report = "\n".join(markdown({"units": done, "command": "smoke"}))
    assert "| OrthoMerge-G + TA | 1 | " in report and "How far OrthoMerge's merged rotations move" in report, report
    generated: dict = {}
    exec(marks({"units": done}), generated)
    assert set(generated["MARKS"]) == {"ties", "orthomerge"}, generated["MARKS"]
    assert generated["MARKS"]["ties"][0].startswith("LoRA adapters, TIES: "), generated["MARKS"]
    assert "| of experts | of multitask | vs TA (95 % CI) | vs best other (95 % CI) |" in report, report
    assert "| TIES | 2 | " in report and "| task arithmetic: +" in report, report
    print("smoke: harness ran", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--families", nargs="+", default=["oft", "lora"], choices=["oft", "lora"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--choose-on", type=int, default=None, help="the seed whose validation picks every row's "
                    "parameters (default: the first of --seeds)")  # fmt: skip
    ap.add_argument("--markdown", help="write the tables from the JSON to this file, run nothing")
    ap.add_argument("--readme", help="rewrite the tables between the quality-llm markers of this file from the JSON")
    ap.add_argument("--marks", help="write `streammerge methods`' marks from the JSON to this file ('-': print)")
    ap.add_argument("--smoke", action="store_true", help="run the harness on a toy model (CI), write nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        with tempfile.TemporaryDirectory() as work:
            smoke(work)
        return 0
    doc = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {"units": {}}
    if args.readme:
        with open(args.readme) as f:
            text = with_readme_tables(f.read(), doc)
        with open(args.readme, "w") as f:
            f.write(text)
        return 0
    if args.marks:
        text = marks(doc)
        if args.marks == "-":
            print(text, end="")
        else:
            with open(args.marks, "w") as f:
                f.write(text)
        return 0
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(markdown(doc)) + "\n")
        return 0
    doc["command"] = "python bench/quality/llm_benchmark.py " + " ".join(sys.argv[1:])

    def save() -> None:
        with open(RESULTS + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(RESULTS + ".tmp", RESULTS)

    data, tok = build(), tokenizer()
    random.seed(0)
    with tempfile.TemporaryDirectory() as work:
        first = args.seeds[0] if args.choose_on is None else args.choose_on
        for seed in [first] + [s for s in args.seeds if s != first]:
            for family in args.families:
                chosen = None if seed == first else doc["units"][f"{family}-s{first}"]
                run_unit(family, seed, data, tok, work, doc["units"], save, chosen=chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
