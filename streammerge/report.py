"""Diagnostics of a merge: `streammerge merge --report FILE.json` records, per merged tensor, what
explains it, and `streammerge report FILE.json` summarises it (and plots it per layer, with
matplotlib, the `report` extra).

Recorded for every tensor, in one extra pass over its inputs in row blocks (the only cost of
--report): ‖τ_i‖ of each expert, the pairwise cosines cos(τ_i, τ_j), and ‖W − W₀‖ of the
merged update. Methods add their own (TensorTask.note) at no extra cost: OrthoMerge the
generator norms ‖Q_i‖, the merged ‖Q*‖, the rotation's share of the update
‖W₀R*ᵀ − W₀‖ / (‖W₀R*ᵀ − W₀‖ + ‖merged residual − W₀‖), the conflicting-row fraction, the
planes reset by the angle rule and the rotation subspace's dimension (base directions below
base_rtol are outside it) and the generators' agreement ‖Σ w_i Q_i‖ / Σ w_i ‖Q_i‖ (1 when
the experts rotate alike, 1/√N when orthogonally; ‖Q*‖ itself is mean ‖Q_i‖ by construction);
the spectral methods their kept rank and the interference removed.

The record is appended per tensor to FILE.json.partial while merging (a resumed merge appends
again; the last record of a tensor wins) and gathered into FILE.json when the merge completes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import textwrap
from typing import Any

import torch

from .errors import UsageError
from .io.atomic import write_bytes_atomic
from .settings import layer_index, with_layer


def generic_stats(task, result: torch.Tensor) -> dict[str, Any]:
    """Task-vector norms, pairwise cosines and the merged update's norm (one pass, row blocks)."""
    n = len(task.weights)
    gram = torch.zeros(n, n, dtype=torch.float64)
    update = 0.0
    for rows in task.row_blocks():
        taus = [task.task_vector(i, rows).double().reshape(-1) for i in range(n)]
        stacked = torch.stack(taus)
        gram += (stacked @ stacked.T).cpu()
        del taus, stacked
        base = task.base_rows(rows).double()
        merged = result if rows is None else result[rows[0] : rows[1]]
        update += float((merged.to(base.device).double() - base).square().sum())
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = [
        [float(gram[i, j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else 0.0 for j in range(n)]
        for i in range(n)
    ]
    return {"task_vector_norms": [float(x) for x in norms], "cosines": cos, "update_norm": math.sqrt(update)}


class ReportWriter:
    def __init__(self, path: str):
        self.path = path
        self.partial = path + ".partial"

    def add(self, name: str, record: dict[str, Any]) -> None:
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tensor": name, **record}) + "\n")
            f.flush()

    def finish(self, header: dict[str, Any], order: list[str]) -> None:
        records: dict[str, dict] = {}
        if os.path.exists(self.partial):
            with open(self.partial, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        records[rec.pop("tensor")] = rec
        doc = {**header, "tensors": {name: records[name] for name in order if name in records}}
        write_bytes_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        if os.path.exists(self.partial):
            os.remove(self.partial)


def kind_of(name: str) -> str:
    return with_layer(name, "*")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rows(doc: dict) -> list[dict[str, Any]]:
    """One row per tensor kind (layers pooled): the quantities worth reading."""
    kinds: dict[str, list[dict]] = {}
    for name, rec in doc["tensors"].items():
        kinds.setdefault(kind_of(name), []).append(rec)
    out = []
    for kind, recs in kinds.items():
        cos = [c for r in recs for i, row in enumerate(r.get("cosines", [])) for j, c in enumerate(row) if j > i]
        ratio = [
            r["update_norm"] / _mean(r["task_vector_norms"])
            for r in recs
            if r.get("task_vector_norms") and _mean(r["task_vector_norms"])
        ]
        share = [r["rotation_share"] for r in recs if r.get("rotation_share") is not None]
        q = [r["generator_agreement"] for r in recs if r.get("generator_agreement") is not None]
        moved = [
            r["rotation_distance"] / _mean(r["expert_rotation_distances"])
            for r in recs
            if r.get("expert_rotation_distances") and _mean(r["expert_rotation_distances"])
        ]
        conflict = [x for r in recs for x in r.get("conflict_row_fraction", [])]
        out.append(
            {
                "kind": kind,
                "tensors": len(recs),
                "mean_cosine": _mean(cos),
                "update_over_mean_tau": _mean(ratio),
                "rotation_share": _mean(share),
                "generator_agreement": _mean(q),
                "rotation_moved": _mean(moved),
                "conflict_rows": _mean(conflict),
                "planes_reset": sum(r.get("planes_reset", 0) for r in recs),
                "kept_rank": _mean(
                    [r["kept_rank"] for r in recs if "kept_rank" in r] + [r["rank"] for r in recs if "rank" in r]
                ),
                "removed_components": sum(sum(r.get("removed_components", [])) for r in recs),
            }
        )
    return out


# (row key, column heading, format, what a record must hold for the column to apply)
COLUMNS = [
    ("mean_cosine", "mean cos(τ_i, τ_j)", "{:.3f}", "cosines"),
    ("update_over_mean_tau", "‖ΔW‖ / mean ‖τ_i‖", "{:.3f}", "task_vector_norms"),
    ("rotation_share", "rotation share", "{:.3f}", "rotation_share"),
    ("generator_agreement", "‖Σ Q_i‖ / Σ ‖Q_i‖", "{:.3f}", "generator_agreement"),
    ("rotation_moved", "‖R* − I‖ / mean ‖R_i − I‖", "{:.3f}", "expert_rotation_distances"),
    ("conflict_rows", "conflicting rows", "{:.1%}", "conflict_row_fraction"),
    ("planes_reset", "planes reset", "{}", "planes_reset"),
    ("kept_rank", "kept rank", "{:.0f}", ("kept_rank", "rank")),
    ("removed_components", "components removed", "{}", "removed_components"),
]


def summary(doc: dict) -> str:
    """One row per tensor kind, with only the columns this method's records hold."""
    recs = list(doc["tensors"].values())

    def applies(needs) -> bool:
        needs = needs if isinstance(needs, tuple) else (needs,)
        return any(k in r for r in recs for k in needs)

    columns = [c for c in COLUMNS if applies(c[3])]
    lines = [
        f"{doc.get('method', '?')} over {len(doc['tensors'])} tensors, {doc.get('experts', '?')} experts",
        "",
        "| tensor kind | n | " + " | ".join(c[1] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in rows(doc):
        cells = ["—" if r[key] is None else fmt.format(r[key]) for key, _, fmt, _ in columns]
        lines.append(f"| {r['kind']} | {r['tensors']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on a file backend, or the one-line error that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plots needs matplotlib: pip install -e '.[report]' in the clone (the text summary works without it)"
        ) from None
    return plt


# what each plot shows, and which way is good: printed under it
PLOTS = {
    "rotation_share": (
        "rotation share of the update",
        "The share of each merged update that the rotation carries (the paper's Figure 4): 0 means "
        "OrthoMerge reduced to its residual method there; higher, the rotation did more of the work.",
    ),
    "mean_cosine": (
        "mean cos(τ_i, τ_j)",
        "How alike the experts' changes are: near 1 they agree and any method will do; near 0 or below "
        "they interfere, which is where the choice of method matters.",
    ),
    "update_over_mean_tau": (
        "‖ΔW‖ / mean ‖τ_i‖",
        "The merged update against an average expert's: near 1 keeps an expert's strength; far below 1, "
        "the experts' changes cancel (raise λ or α, or use a method that resolves conflicts).",
    ),
    "conflict_rows": (
        "conflicting rows",
        "The fraction of each expert's rows that point against the experts' mean (OrthoMerge-C's targets): "
        "more conflict, more for the rotation to resolve.",
    ),
    "kept_rank": (
        "kept rank",
        "The rank the spectral method kept of each weight: higher keeps more of each expert; it is at most "
        "min(rows, columns).",
    ),
}


def plot(doc: dict, folder: str) -> list[str]:
    """Per-layer curves of the quantities above, one PNG per quantity (needs matplotlib): integer
    layer ticks, the legend beside the axes, and a sentence under each saying how to read it."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    os.makedirs(folder, exist_ok=True)
    written = []
    per_layer: dict[str, dict[str, dict[int, float]]] = {q: {} for q in PLOTS}
    for name, rec in doc["tensors"].items():
        layer = layer_index(name)
        if layer is None:
            continue
        kind = name.split(f"layers.{layer}.", 1)[1].removesuffix(".weight")
        one = rows({"tensors": {name: rec}})[0]
        for q in PLOTS:
            if one[q] is not None:
                per_layer[q].setdefault(kind, {})[layer] = one[q]
    for q, (label, sentence) in PLOTS.items():
        if not per_layer[q]:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for kind, series in sorted(per_layer[q].items()):
            xs = sorted(series)
            ax.plot(xs, [series[x] for x in xs], marker="o", label=kind)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{doc.get('method', '')}: {label}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.text(0.01, 0.01, textwrap.fill(sentence, 110), fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = os.path.join(folder, f"{q}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
