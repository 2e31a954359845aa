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
from typing import Any

import torch

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
        conflict = [x for r in recs for x in r.get("conflict_row_fraction", [])]
        out.append(
            {
                "kind": kind,
                "tensors": len(recs),
                "mean_cosine": _mean(cos),
                "update_over_mean_tau": _mean(ratio),
                "rotation_share": _mean(share),
                "generator_agreement": _mean(q),
                "conflict_rows": _mean(conflict),
                "planes_reset": sum(r.get("planes_reset", 0) for r in recs),
                "kept_rank": _mean(
                    [r["kept_rank"] for r in recs if "kept_rank" in r] + [r["rank"] for r in recs if "rank" in r]
                ),
                "removed_components": sum(sum(r.get("removed_components", [])) for r in recs),
            }
        )
    return out


def summary(doc: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)

    lines = [
        f"{doc.get('method', '?')} over {len(doc['tensors'])} tensors, {doc.get('experts', '?')} experts",
        "",
        "| tensor kind | n | mean cos(τ_i, τ_j) | ‖ΔW‖ / mean ‖τ_i‖ | rotation share | ‖Σ Q_i‖ / Σ ‖Q_i‖ | "
        "conflicting rows | planes reset | kept rank | components removed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(doc):
        lines.append(
            f"| {r['kind']} | {r['tensors']} | {f(r['mean_cosine'])} | {f(r['update_over_mean_tau'])} | "
            f"{f(r['rotation_share'])} | "
            f"{f(r['generator_agreement'])} | {f(r['conflict_rows'], '{:.1%}')} | {r['planes_reset']} | "
            f"{f(r['kept_rank'], '{:.0f}')} | {r['removed_components']} |"
        )
    return "\n".join(lines)


def plot(doc: dict, folder: str) -> list[str]:
    """Per-layer curves of the quantities above, one PNG per quantity (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "plots need matplotlib: pip install 'streammerge[report]' (the text summary works without it)"
        ) from None
    os.makedirs(folder, exist_ok=True)
    written = []
    quantities = {
        "rotation_share": "rotation share of the update",
        "mean_cosine": "mean cos(τ_i, τ_j)",
        "update_over_mean_tau": "‖ΔW‖ / mean ‖τ_i‖",
    }
    per_layer: dict[str, dict[str, dict[int, float]]] = {q: {} for q in quantities}
    for name, rec in doc["tensors"].items():
        layer = layer_index(name)
        if layer is None:
            continue
        kind = name.split(f"layers.{layer}.", 1)[1].removesuffix(".weight")
        one = rows({"tensors": {name: rec}})[0]
        for q in quantities:
            if one[q] is not None:
                per_layer[q].setdefault(kind, {})[layer] = one[q]
    for q, label in quantities.items():
        if not per_layer[q]:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, series in sorted(per_layer[q].items()):
            xs = sorted(series)
            ax.plot(xs, [series[x] for x in xs], marker="o", label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{doc.get('method', '')}: {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, f"{q}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
