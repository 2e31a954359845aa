"""multislerp: barycentric interpolation of N experts on the hypersphere (mergekit 0.1.5's
`multislerp`). With x_i the experts' task vectors (`relative`: a base is given) or the experts
themselves, flattened; w the weights (divided by their sum if `normalize_weights`):
    u_i = x_i / (‖x_i‖ + ε),  m = Σ w_i u_i / ‖Σ w_i u_i‖,  g = Σ w_i (u_i − ⟨u_i, m⟩ m),
    x = (m cos‖g‖' + g sin‖g‖'/‖g‖') · Σ w_i ‖x_i‖,   ‖g‖' = ‖g‖ + ε,
and W = W_0 + x (or x). One expert is returned unchanged. Where Σ w_i u_i vanishes, two experts
are averaged linearly and more are refused (mergekit does the same) — except where every task
vector is zero (a tensor no expert changed): that is the base, where mergekit stops. Whole
tensors in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import REQUIRED, Method, TensorTask, whole_tensor_memory


@dataclass(frozen=True)
class MultislerpParams:
    normalize_weights: bool = True
    eps: float = 1e-8
    relative: bool = True  # mergekit: a base_model is given


def merge(task: TensorTask, params: MultislerpParams) -> torch.Tensor:
    n = len(task.weights)
    if n == 1:
        return task.experts[0]
    xs = torch.stack([task.task_vector(i) if params.relative else task.experts[i] for i in range(n)])
    flat = xs.view(n, -1)
    w = torch.tensor(task.weights, dtype=xs.dtype, device=xs.device)
    if params.normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + params.eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if params.relative and not bool(norms.any()):
        return task.base.clone()  # no expert changes this tensor (mergekit stops with an error here)
    if mean_norm < params.eps:
        if n == 2:
            out = xs[0] * w[0] + xs[1] * w[1]
            return out + task.base if params.relative else out
        raise ValueError(
            f"tensor {task.name}: the weighted sum of the unit task vectors is zero (antipodal experts); change the "
            "weights"
        )
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    del units
    tn = torch.norm(tangent) + params.eps
    out = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    out = out.view(task.shape)
    return out + task.base if params.relative else out


METHOD = Method(
    "multislerp",
    MultislerpParams,
    merge,
    memory=whole_tensor_memory(6.0, 3.5),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={"weight": REQUIRED},
)
