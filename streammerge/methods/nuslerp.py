"""nuslerp: spherical interpolation of two experts' task vectors (mergekit 0.1.5's `nuslerp`).

t = w_2 / (w_1 + w_2) (0.5 when the weights sum to ~0). With the base (`relative`, mergekit:
a base_model is given): W = W_0 + slerp(t, τ_1, τ_2); without: W = slerp(t, W_1, W_2), where
    slerp(t, x, y) = (sin((1−t)θ) x + sin(tθ) y) / sin θ,   cos θ = ⟨x/‖x‖, y/‖y‖⟩,
and (1−t)x + t·y where 1 − cos²θ ≤ 1e-16. `flatten` (default): θ over the whole tensor;
otherwise per row (`row_wise`: per column). Whole tensors: inputs and result in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import REQUIRED, Method, TensorTask, whole_tensor_memory

EPS = 1e-8


@dataclass(frozen=True)
class NuslerpParams:
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True
    relative: bool = True  # interpolate task vectors and add the base (mergekit: base_model given)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def merge(task: TensorTask, params: NuslerpParams) -> torch.Tensor:
    if len(task.weights) != 2:
        raise ValueError(f"nuslerp interpolates exactly two experts, got {len(task.weights)}")
    total = sum(task.weights)
    t = 0.5 if abs(total) < 1e-6 else task.weights[1] / total
    dim = 0 if params.nuslerp_row_wise else -1
    if params.relative:
        base = task.base
        return base + nuslerp(t, task.task_vector(0), task.task_vector(1), dim, params.nuslerp_flatten)
    return nuslerp(t, task.experts[0], task.experts[1], dim, params.nuslerp_flatten)


METHOD = Method(
    "nuslerp",
    NuslerpParams,
    merge,
    memory=whole_tensor_memory(8.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={"weight": REQUIRED},
    min_experts=2,
    max_experts=2,
)
