"""ortho_svd: SVD Ortho-Merge, deconflict then harmonise (the SVD Ortho-Merge paper, §4).

Per 2-D tensor: each τ_i = Σ_s σ_{i,s} u_{i,s} v_{i,s}ᵀ (compact SVD; a LoRA expert's from its
factors). For every pair of experts i < j and leading indices m, n ≤ k, the signed similarity
s = ⟨u_{i,m}, u_{j,n}⟩ (eq. 13); where |s| > τ (redundant if > τ, oppositional if < −τ) the
weaker singular component — the smaller σ, expert j's on a tie — is removed from its task vector
(eq. 14; each component at most once, all decisions taken on the original SVDs). The deconflicted
task vectors are summed and harmonised as iso_c: W = W₀ + α · σ̄ U Vᵀ of the sum (eqs. 15–16).
Tensors that are not 2-D get W₀ + α · mean τ_i.

τ and k: the paper publishes neither. Our defaults, τ = 0.5 and k = 16, are provisional, chosen
so that only clearly shared or opposed leading directions count as interference (|cos| > 0.5,
i.e. within 60° of each other) among the directions that carry most of a fine-tuning update;
the quality benchmark is where they are to be settled.

Streaming: pass 1 keeps each expert's top-k triplets only; pass 2 sums τ_i minus its removed
components; then one SVD of the sum. Tall tensors larger than one row block go through Gram
matrices instead (`merge_tall`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from ..plan import Need
from . import spectral_common
from .base import check_choice, PRECISIONS, Rows, TensorTask, check_finite, check_range
from .iso_c import whole_memory as iso_memory


@dataclass(frozen=True)
class OrthoSvdParams:
    threshold: float = 0.5  # τ on |⟨u_{i,m}, u_{j,n}⟩|
    top_k: int = 16  # leading directions compared per expert
    alpha: float = 1.0
    precision: str = "auto"  # as tsv

    def __post_init__(self) -> None:
        check_range("threshold", self.threshold, 0.0, 1.0)
        if self.top_k < 1:
            raise ValueError(f"top_k = {self.top_k} must be at least 1")
        check_finite("alpha", self.alpha)
        check_choice("precision", self.precision, PRECISIONS)


def interfering(us: list[torch.Tensor], ss: list[torch.Tensor], threshold: float) -> list[set[int]]:
    """Per expert, the indices of the components to remove (eq. 14), from the leading left
    singular vectors us[i] [m, k_i] and values ss[i]."""
    removed: list[set[int]] = [set() for _ in us]
    for i in range(len(us)):
        for j in range(i + 1, len(us)):
            sim = us[i].T @ us[j]
            for m, n in (sim.abs() > threshold).nonzero().tolist():
                if float(ss[i][m]) < float(ss[j][n]):
                    removed[i].add(m)
                else:
                    removed[j].add(n)
    return removed


def merge_tall(task: TensorTask, params: OrthoSvdParams, floor: float) -> torch.Tensor:
    """A tall tensor larger than one block: each τ_i's top-k right vectors and σ from its Gram
    matrix; the left ones' overlaps U_iᵀU_j (k×k) summed over blocks (U_i = τ_i V_i σ_i⁻¹,
    row-local); the removed components subtracted block by block (τ_i − τ_i V_rem V_remᵀ, since
    σ u vᵀ = τ v vᵀ); then iso_c's tall path on that sum. Five reads of each expert."""
    from .iso_c import merge_tall as iso_tall

    blocks = task.row_blocks()
    n = len(task.weights)
    device = task.base_rows(blocks[0]).device
    g = spectral.gram_dtype(device)
    lead = spectral_common.expert_right_vectors(task, floor, params.top_k, g)  # pass 1
    proj = [v / s for v, s in lead]
    overlaps = {
        (i, j): torch.zeros(lead[i][1].numel(), lead[j][1].numel(), dtype=g, device=device)
        for i in range(n)
        for j in range(i + 1, n)
    }
    for rows in blocks:  # pass 2: U_iᵀ U_j
        us = [task.task_vector(i, rows).to(g) @ proj[i] for i in range(n)]
        for (i, j), c in overlaps.items():
            c.addmm_(us[i].T, us[j])
        del us
    removed: list[set[int]] = [set() for _ in range(n)]
    for (i, j), c in overlaps.items():
        for m, k in (c.abs() > params.threshold).nonzero().tolist():
            if float(lead[i][1][m]) < float(lead[j][1][k]):
                removed[i].add(m)
            else:
                removed[j].add(k)
    task.note("removed_components", [len(r) for r in removed])
    task.note("removed_energy", [float(sum(float(lead[i][1][m]) ** 2 for m in removed[i])) for i in range(n)])
    drop = [lead[i][0][:, sorted(removed[i])] for i in range(n)]

    def deconflicted_sum(rows: Rows | None) -> torch.Tensor:
        total = None
        for i in range(n):
            t = task.task_vector(i, rows).to(g)
            if drop[i].shape[1]:
                t -= (t @ drop[i]) @ drop[i].T
            total = t if total is None else total.add_(t)
        return total  # type: ignore[return-value]

    return iso_tall(task, params, floor, deconflicted_sum)  # type: ignore[arg-type]


def merge_whole(task: TensorTask, params: OrthoSvdParams, dtype: torch.dtype, floor: float) -> torch.Tensor:
    n = len(task.weights)
    lead = []
    for i in range(n):
        u, s, vh = spectral_common.task_svd(task, i, dtype, floor)
        lead.append((u[:, : params.top_k].clone(), s[: params.top_k].clone(), vh[: params.top_k].clone()))
        del u, s, vh
    removed = interfering([u for u, _, _ in lead], [s for _, s, _ in lead], params.threshold)
    task.note("removed_components", [len(r) for r in removed])
    task.note("removed_energy", [float(sum(float(lead[i][1][m]) ** 2 for m in removed[i])) for i in range(n)])
    total = None
    for i in range(n):
        tau = task.task_vector(i).to(dtype)
        if removed[i]:
            idx = torch.tensor(sorted(removed[i]), device=tau.device)
            u, s, vh = lead[i]
            tau -= (u[:, idx] * s[idx]) @ vh[idx]
        total = tau if total is None else total.add_(tau)
        del tau
    u, s, vh = spectral.compact_svd(total, floor)  # type: ignore[arg-type]
    return task.base + spectral.isotropic(u, s, vh).mul_(params.alpha).to(task.base.dtype)


def memory(name: str, shape: tuple[int, ...], n: int, params: OrthoSvdParams, itemsize: int):
    """iso_c's (one full SVD at a time), plus each expert's top-k triplets; tall tensors in
    blocks: iso_c's tall path plus one block (fitted to measured peaks: the pass-1 Gram matrix is
    freed before iso_c's)."""
    from .base import BLOCK_ELEMENTS
    from .iso_c import memory as iso_tall_memory

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) == 2 and numel > BLOCK_ELEMENTS and shape[0] >= shape[1]:
        tall = iso_tall_memory(name, shape, n, params, itemsize)
        return Need(tall.work + int(BLOCK_ELEMENTS * 8), transfer=BLOCK_ELEMENTS)

    need = iso_memory(name, shape, n, params, itemsize)
    if len(shape) != 2:
        return need
    m, k = shape
    return Need(need.work + 8 * n * params.top_k * (m + k + 1))


METHOD = spectral_common.spectral_method("ortho_svd", OrthoSvdParams, merge_tall, merge_whole, memory, __doc__ or "")
merge = METHOD.merge
