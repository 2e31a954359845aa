"""karcher: the Karcher (Riemannian) mean of the experts' directions on the unit hypersphere,
rescaled by their mean norm (mergekit 0.1.5's `karcher`; every input weighs 1/N, and mergekit
counts the base among the inputs: its recipes list it as a model here).

    u_i = W_i/‖W_i‖ (inputs with ‖W_i‖ ≤ tol are left out of the mean),
    m ← normalised Σ α_i u_i, then up to `max_iter` times:
        g = Σ α_i θ_i/sin θ_i (u_i − cos θ_i m),  θ_i = arccos⟨m, u_i⟩ (terms with θ_i < tol skipped),
        stop if ‖g‖ < tol, else m ← normalise(cos‖g‖ m + sin‖g‖ g/‖g‖);
    W = (Σ_i ‖W_i‖/N) · m.
Whole tensors in memory (the N unit vectors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, TensorTask, register, whole_tensor_memory


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if float(nm) == 0.0 else t / nm for t, nm in zip(tensors, norms)]
    valid = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    alpha = [alphas[i] / a_sum for i in valid]
    us = [units[i] for i in valid]
    del units
    mean = torch.zeros_like(us[0])
    for a, u in zip(alpha, us):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alpha, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(a * nm for a, nm in zip(alphas, norms)) * mean


def merge(task: TensorTask, params: KarcherParams) -> torch.Tensor:
    n = len(task.weights)
    return karcher_mean([task.experts[i] for i in range(n)], [1.0 / n] * n, params.max_iter, params.tol)


register(Method("karcher", KarcherParams, merge, memory=whole_tensor_memory(4.0, 2.0), doc=__doc__ or "", propagates_nonfinite=True,
                expert_params={}))
