"""do_merging: decouple magnitude and direction, orthogonalise directions, merge (DO-Merging,
the paper in shared/papers/do-merging-paper.txt, whose equations did not survive in our copy).

What we implement, per 2-D tensor τ_i [out, in] (torch layout: a row is one output dimension —
the paper's "column", the coefficients of one output):
1. Decouple: m_i = per-row norms of τ_i (the magnitude vector), D_i = τ_i / m_i (rows of unit
   norm; zero rows stay zero).
2. Orthogonalise, data-free and per layer: small perturbations δ_i that lower the cross-task
   inner products, found by `steps` of gradient descent (step `lr`) on
       L(δ) = Σ_{i<j} overlap(X_i, X_j) + γ Σ_i ‖δ_i‖² / ‖D_i‖²,   X_i = D_i + δ_i,
   after each step projecting every δ_i back onto ‖δ_i‖ ≤ ε‖D_i‖ (the bound that keeps each
   expert's own behaviour: the paper's "constraints on parameter variation ranges").
   - Full matrices: overlap = cos²(X_i, X_j), Frobenius; step δ_i −= lr·‖D_i‖²·∂L/∂X_i (the
     loss is scale-free, so this moves X_i by about lr of its norm). Gradient descent from δ = 0
     never leaves span{D_1 … D_N}, so it runs exactly on coefficients C (X_i = Σ_k C_ik D_k), the
     gradient taken through the N×N Gram matrix M of the D_k (∂L/∂C · M⁻¹): the same iterates
     (tested against the full-matrix descent) at O(N³) per step instead of O(N² out·in).
   - LoRA experts (τ_i = B_i A_i, the paper's case): the perturbations act on the factors, as
     the paper does, with overlap = ‖A_i A_jᵀ‖²_F/(‖A_i‖²‖A_j‖²) + ‖B_iᵀ B_j‖²_F/(‖B_i‖²‖B_j‖²),
     the r×r cross-products of their input and output subspaces; then X_i = row-normalised B̂_i Â_i
     and m_i the row norms of B̂_i Â_i (the paper orthogonalises the factors, then decouples).
3. Merge: magnitudes averaged, m̄ = mean m_i; directions summed and re-normalised per row,
   d = Σ X_i / ‖Σ X_i‖_row; W = W₀ + λ · m̄ ⊙ d. At λ = 1 one expert is reproduced exactly (δ = 0, d = D_1).
Defaults: steps 100, lr 0.1, γ 1, ε 0.1, λ 0.5 — the overlap loss is scale-free (cosines), so a
step of 0.1 moves a unit-norm direction by at most a few percent, and ε = 0.1 lets each direction
turn by at most ~6°. λ = 0.5, not 1: on bench/quality (MiniLM, five tasks, OFT, LoRA and full
experts, three seeds) validation chose λ 0.3 or 0.5 every time, 1.4–3.0 points above λ 1; the
average magnitude put back at full length along a direction that sums N tasks overshoots. No
randomness: the descent starts at δ = 0 (deterministic for any seed).
Tensors that are not 2-D get W₀ + λ · mean τ_i. Streamed in row blocks, two reads of each expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import spectral_common
from .base import Method, Rows, TensorTask, check_finite, elementwise_memory_blocks, map_row_blocks
from ..math import lapack


@dataclass(frozen=True)
class DoMergingParams:
    steps: int = 100
    lr: float = 0.1
    gamma: float = 1.0
    bound: float = 0.1  # ε: ‖δ_i‖ ≤ ε‖D_i‖
    lambda_: float = 0.5  # see the module docstring

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps = {self.steps} must be ≥ 0")
        for name, v in (("lr", self.lr), ("gamma", self.gamma), ("bound", self.bound)):
            if not v >= 0:
                raise ValueError(f"{name} = {v} must be ≥ 0")
        check_finite("lambda", self.lambda_)


def pairwise_overlap(gram: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} cos² from a Gram matrix G_ij = ⟨X_i, X_j⟩."""
    d = gram.diagonal()
    cos2 = gram.square() / (d[:, None] * d[None, :]).clamp_min(torch.finfo(gram.dtype).tiny)  # zero τ: overlap 0
    return cos2.triu(1).sum()


def orthogonalise_coefficients(m: torch.Tensor, params: DoMergingParams) -> torch.Tensor:
    """C (N×N) with X_i = Σ_k C_ik D_k, from the Gram matrix M_kl = ⟨D_k, D_l⟩ (float64)."""
    n = m.shape[0]
    eye = torch.eye(n, dtype=m.dtype)
    c = eye.clone().requires_grad_(True)
    norms2 = m.diagonal().clamp_min(torch.finfo(m.dtype).tiny)
    metric = lapack.pinv(m, hermitian=True)  # ∂L/∂C · M⁻¹ is the matrix gradient's coordinates
    for _ in range(params.steps):
        delta = c - eye
        loss = pairwise_overlap(c @ m @ c.T) + params.gamma * ((delta @ m) * delta).sum(1).div(norms2).sum()
        (grad,) = torch.autograd.grad(loss, c)
        with torch.no_grad():
            # the full-matrix step δ_i −= lr·‖D_i‖²·∂L/∂X_i (scale-free: L(cX) = L(X)), in coefficients
            c -= params.lr * norms2[:, None] * (grad @ metric)
            delta = c - eye
            size = ((delta @ m) * delta).sum(1).clamp_min(0).sqrt()  # ‖δ_i‖
            limit = params.bound * norms2.sqrt()
            scale = torch.where(size > limit, limit / size.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(size))
            c.copy_(eye + delta * scale[:, None])
    return c.detach()


def orthogonalise_factors(
    bs: list[torch.Tensor], as_: list[torch.Tensor], params: DoMergingParams
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Perturbed LoRA factors (B̂_i, Â_i) lowering the cross-subspace overlaps (see the docstring)."""
    b0 = [b.detach() for b in bs]
    a0 = [a.detach() for a in as_]
    db = [torch.zeros_like(b, requires_grad=True) for b in b0]
    da = [torch.zeros_like(a, requires_grad=True) for a in a0]
    nb = [float(b.square().sum()) or 1.0 for b in b0]
    na = [float(a.square().sum()) or 1.0 for a in a0]
    n = len(b0)
    for _ in range(params.steps):
        bh = [b + d for b, d in zip(b0, db)]
        ah = [a + d for a, d in zip(a0, da)]
        loss = torch.zeros((), dtype=b0[0].dtype)
        for i in range(n):
            for j in range(i + 1, n):
                loss = loss + (ah[i] @ ah[j].T).square().sum() / (
                    ah[i].square().sum() * ah[j].square().sum()
                ).clamp_min(1e-30)
                loss = loss + (bh[i].T @ bh[j]).square().sum() / (
                    bh[i].square().sum() * bh[j].square().sum()
                ).clamp_min(1e-30)
        loss = (
            loss
            + params.gamma * sum(d.square().sum() / s for d, s in zip(db, nb))
            + params.gamma * sum(d.square().sum() / s for d, s in zip(da, na))
        )
        grads = torch.autograd.grad(loss, db + da)
        with torch.no_grad():
            for d, g, s in zip(db + da, grads, nb + na):
                d -= params.lr * g * s  # L(cA) = L(A), so ‖∇L‖ ~ 1/‖A‖: ‖A‖²·∇L is a step in units of ‖A‖
                size = float(d.norm())
                if size > params.bound * s**0.5:
                    d.mul_(params.bound * s**0.5 / size)
    return [b + d.detach() for b, d in zip(b0, db)], [a + d.detach() for a, d in zip(a0, da)]


def row_normalised(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / its row norms, the row norms); zero rows stay zero."""
    norms = t.norm(dim=1)
    return t / norms.clamp_min(torch.finfo(t.dtype).tiny)[:, None], norms


def merge(task: TensorTask, params: DoMergingParams) -> torch.Tensor:
    """Two passes over row blocks (everything here is per row but the N×N Gram matrix and the
    small LoRA factors): the orthogonalisation's inputs, then the merged rows."""
    if len(task.shape) != 2:
        return spectral_common.mean_update(task, params.lambda_)
    n = len(task.weights)
    factors = [task.task_factors(i) for i in range(n)]
    if all(f is not None for f in factors):  # LoRA experts: orthogonalise the factors
        # type: ignore[index]
        bs, as_ = orthogonalise_factors([f[0].double() for f in factors], [f[1].double() for f in factors], params)
        bs, as_ = [b.to(task.dtype) for b in bs], [a.to(task.dtype) for a in as_]

        def directions(rows: Rows | None) -> tuple[torch.Tensor, torch.Tensor]:
            direction = magnitude = None
            for b, a in zip(bs, as_):
                d, m = row_normalised(b @ a if rows is None else b[rows[0] : rows[1]] @ a)
                direction = d if direction is None else direction.add_(d)
                magnitude = m if magnitude is None else magnitude.add_(m)
            return direction, magnitude  # type: ignore[return-value]
    else:
        gram = torch.zeros(n, n, dtype=torch.float64)
        for rows in task.row_blocks():  # pass 1: M_kl = ⟨D_k, D_l⟩
            ds = torch.stack([row_normalised(task.task_vector(i, rows))[0].reshape(-1) for i in range(n)]).double()
            gram += (ds @ ds.T).cpu()
            del ds
        weights = orthogonalise_coefficients(gram, params).sum(0)  # Σ_i X_i = Σ_k (Σ_i C_ik) D_k

        def directions(rows: Rows | None) -> tuple[torch.Tensor, torch.Tensor]:
            direction = magnitude = None
            for k in range(n):
                d, m = row_normalised(task.task_vector(k, rows))
                d.mul_(float(weights[k]))
                direction = d if direction is None else direction.add_(d)
                magnitude = m if magnitude is None else magnitude.add_(m)
            return direction, magnitude  # type: ignore[return-value]

    def block(rows: Rows | None) -> torch.Tensor:  # pass 2: W = W₀ + λ · m̄ ⊙ d
        direction, magnitude = directions(rows)
        direction, _ = row_normalised(direction)
        return task.base_rows(rows) + direction.mul_((magnitude / n)[:, None]).mul_(params.lambda_)

    return map_row_blocks(task, block)


METHOD = Method(
    "do_merging",
    DoMergingParams,
    merge,
    memory=elementwise_memory_blocks(7.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
)
