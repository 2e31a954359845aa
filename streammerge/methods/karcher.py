"""karcher: the Karcher (Riemannian) mean of the experts' directions on the unit hypersphere,
rescaled by their mean norm (mergekit 0.1.5's `karcher`; every input weighs 1/N, and mergekit
counts the base among the inputs: its recipes list it as a model here).

    u_i = W_i/‖W_i‖ (inputs with ‖W_i‖ ≤ tol are left out of the mean),
    m ← normalised Σ α_i u_i, then up to `max_iter` times:
        g = Σ α_i θ_i/sin θ_i (u_i − cos θ_i m),  θ_i = arccos⟨m, u_i⟩ (terms with θ_i < tol skipped),
        stop if ‖g‖ < tol, else m ← normalise(cos‖g‖ m + sin‖g‖ g/‖g‖);
    W = (Σ_i ‖W_i‖/N) · m.

Streaming: a tensor whose N inputs fit `WHOLE_BYTES` is merged whole, as mergekit does. A larger
one (a 128k-vocabulary embedding) needs no copy of it: m stays in the span of the u_i, so with
m = Σ β_i u_i every step above needs only the Gram matrix ⟨W_i, W_j⟩, summed over row blocks in
float64; the iteration runs on β (N numbers), then one more pass writes Σ β_i u_i block by block.
The result equals the whole-tensor merge to float32 round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import math

from ..plan import Need
from .base import BLOCK_ELEMENTS, Method, Rows, TensorTask, holds_whole, map_row_blocks, ordered_sum

WHOLE_BYTES = 1 << 28  # the N inputs of one tensor are held whole up to this size


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
            dot = torch.clamp(ordered_sum(mean * u), -1.0, 1.0)  # not torch.dot: its bits depend on the thread count
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


def karcher_coefficients(
    gram: torch.Tensor, alphas: list[float], max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`karcher_mean` on coefficients: given the float64 Gram matrix of the inputs, (β, norms)
    with m = Σ β_i W_i/‖W_i‖ (β_i = 0 for inputs left out)."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    units = gram / torch.outer(scale, scale)  # ⟨u_i, u_j⟩ (0 for a zero input)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    beta = torch.zeros(n, dtype=torch.float64)
    if not valid:
        return beta, norms
    a_sum = sum(alphas[i] for i in valid)
    alpha = torch.zeros(n, dtype=torch.float64)
    for i in valid:
        alpha[i] = alphas[i] / a_sum

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    beta = alpha.clone()
    mean_norm = norm(beta)
    if mean_norm < tol:
        beta = torch.zeros(n, dtype=torch.float64)
        beta[valid[0]] = 1.0
    else:
        beta = beta / mean_norm
    for _ in range(max_iter):
        dots = (units @ beta).clamp(-1.0, 1.0)
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = float(alpha[i]) * theta / math.sin(theta)
            tangent[i] += step
            tangent -= step * float(dots[i]) * beta
        tn = norm(tangent)
        if tn < tol:
            break
        beta = math.cos(tn) * beta + math.sin(tn) * (tangent / tn)
        un = norm(beta)
        if un > tol:
            beta = beta / un
    return beta, norms


def merge(task: TensorTask, params: KarcherParams) -> torch.Tensor:
    n = len(task.weights)
    if n == 1 or holds_whole(task, n, WHOLE_BYTES):
        return karcher_mean([task.experts[i] for i in range(n)], [1.0 / n] * n, params.max_iter, params.tol)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for rows in task.row_blocks():
        flat = torch.stack([task.expert_rows(i, rows).reshape(-1) for i in range(n)]).to(torch.float64)
        gram += (flat @ flat.T).cpu()
        del flat
    beta, norms = karcher_coefficients(gram, [1.0 / n] * n, params.max_iter, params.tol)
    size = float(sum(norms[i] for i in range(n)) / n)
    coef = [size * float(beta[i]) / float(norms[i]) if float(beta[i]) != 0.0 else 0.0 for i in range(n)]

    def block(rows: Rows | None) -> torch.Tensor:
        out = None
        for i in range(n):
            if coef[i] == 0.0:
                continue
            term = task.expert_rows(i, rows).mul_(coef[i])
            out = term if out is None else out.add_(term)
        return out if out is not None else torch.zeros_like(task.base_rows(rows))

    return map_row_blocks(task, block)


def memory(name: str, shape: tuple[int, ...], n: int, params: KarcherParams, itemsize: int):
    """Whole: about 4 + 2N copies of the tensor; streamed: N blocks, their float64 stack and
    the output block."""

    numel = math.prod(shape)
    if numel <= BLOCK_ELEMENTS or n * numel * itemsize <= WHOLE_BYTES:
        return Need(int((4 + 2 * n) * numel * itemsize))
    return Need(int((3 * n + 4) * BLOCK_ELEMENTS * itemsize), transfer=BLOCK_ELEMENTS)


METHOD = Method(
    "karcher", KarcherParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={}
)
