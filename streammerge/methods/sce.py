"""sce: select, calculate, erase (Wan et al., 2024; mergekit 0.1.5's `sce`).

Select: with `select_topk` < 1, keep the k = ⌊select_topk · #nonzero⌋ entries of largest
variance across the experts' task vectors (population variance), in every task vector.
Calculate: expert weights ∝ mean(τ_i²) (equal if those sum to ~0). Erase: TIES's sign
election (sign of Σ τ_i, 0 → +), then W = W_0 + Σ a_i c_i τ_i / max(Σ a_i c_i, 1e-6) with a_i
the agreement mask. Ties at the top-k threshold follow torch.topk, as in mergekit. Whole
tensors in memory (the N task vectors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, TensorTask, register, whole_tensor_memory


@dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0
    int8_mask: bool = False  # mergekit's mask storage; no effect on the result


def merge(task: TensorTask, params: SceParams) -> torch.Tensor:
    n = len(task.weights)
    base = task.base
    tvs = torch.stack([task.task_vector(i) for i in range(n)])
    if params.select_topk <= 0:
        tvs.zero_()
    elif params.select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * params.select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs.mul_(mask.unsqueeze(0))
        del var, mask
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(tvs.dtype)
    erase = (tvs.sign() == majority).to(tvs.dtype)
    weights = tvs.square().reshape(n, -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.ones_like(weights) / n if abs(total) < 1e-6 else weights / total
    erase.mul_(weights.view(-1, *([1] * (tvs.dim() - 1))))
    merged = (tvs * erase).sum(dim=0) / erase.sum(dim=0).clamp(min=1e-6)
    return base + merged


register(Method("sce", SceParams, merge, memory=whole_tensor_memory(4.0, 3.0), doc=__doc__ or "", propagates_nonfinite=True,
                expert_params={}))
