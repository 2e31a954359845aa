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
components; then one SVD of the sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from . import Method, TensorTask, check_finite, check_range, register
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
        spectral.check_precision(self.precision)


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


def merge(task: TensorTask, params: OrthoSvdParams) -> torch.Tensor:
    if len(task.shape) != 2:
        return spectral.mean_update(task, params.alpha)
    n = len(task.weights)
    dtype, floor = spectral.setup(task, params.precision)
    lead = []
    for i in range(n):
        u, s, vh = spectral.task_svd(task, i, dtype, floor)
        lead.append((u[:, :params.top_k].clone(), s[:params.top_k].clone(), vh[:params.top_k].clone()))
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
    """iso_c's (one full SVD at a time), plus each expert's top-k triplets."""
    from ..plan import Need

    need = iso_memory(name, shape, n, params, itemsize)
    if len(shape) != 2:
        return need
    m, k = shape
    return Need(need.work + 8 * n * params.top_k * (m + k + 1))


register(Method("ortho_svd", OrthoSvdParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={}))
