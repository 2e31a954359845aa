"""model_stock: interpolate between the base and the experts' average by how much the experts'
task vectors agree (Jang et al., 2024; mergekit 0.1.5's `model_stock`, at least two experts).

    cos θ = mean over expert pairs of ⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6),
    t = N cos θ / (1 + (N−1) cos θ)   (t = 0 where the denominator is below 1e-6),
    W = t · (Σ W_i / N) + (1 − t) · W_0,
over the flattened tensor, or per row with `filter_wise`. Whole tensors in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, TensorTask, register, whole_tensor_memory


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False


def merge(task: TensorTask, params: ModelStockParams) -> torch.Tensor:
    n = len(task.weights)
    if n < 2:
        raise ValueError("model_stock needs at least two experts besides the base")
    w0 = task.base
    if params.filter_wise:
        w0v = w0.unsqueeze(0) if w0.dim() == 1 else w0
        ws = [task.experts[i] for i in range(n)]
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in ws]
    else:
        w0v = w0.reshape(-1)
        ws = [task.experts[i].reshape(-1) for i in range(n)]
    offsets = [w - w0v for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0v).reshape(task.shape)


register(Method("model_stock", ModelStockParams, merge, memory=whole_tensor_memory(5.0, 2.0), doc=__doc__ or "", propagates_nonfinite=True,
                expert_params={}))
