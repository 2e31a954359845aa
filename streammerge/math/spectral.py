"""Small pure functions for the spectral merge methods (TSV-M, iso_c, iso_cts, ortho_svd).

Conventions: a task vector τ is an [m, n] matrix; `compact_svd` returns U [m, r], σ [r], Vᵀ [r, n]
with σ descending and r its numerical rank: singular values at or below the noise floor are the
rounding noise of the inputs, not directions — a LoRA update stored as a dense float32 model has
rank r plus noise at ~1e-8·σ_max. The floor is 4·eps·rms(W₀)·(√m + √n), the largest singular
value of a matrix of independent rounding errors of W₀'s entries (eps of the dtype the task
vectors are formed in, float32 by default), and at least max(m, n)·eps·σ_max in the SVD's own
dtype. The authors' code keeps all min(m, n); for full-rank task vectors the two agree, for
low-rank ones the noise directions would otherwise get iso_c's mean singular value and add
arbitrary directions to the merge.
"""

from __future__ import annotations

import torch

from . import lapack
from .robust import svd


def compact_svd(m: torch.Tensor, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ of `m` restricted to its numerical rank (robust SVD with fallbacks); `floor`:
    the inputs' noise floor (`noise_floor`), below which σ are not directions."""
    u, s, vh = svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0], s[:0], vh[:0]
    r = int((s > max(floor, float(s[0]) * max(m.shape) * torch.finfo(s.dtype).eps)).sum())
    return u[:, :r], s[:r], vh[:r]


def low_rank_svd(
    b: torch.Tensor, a: torch.Tensor, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compact_svd(b @ a) from its factors b [m, r], a [r, n] in O((m + n) r²): QR of b and aᵀ,
    then the SVD of the r×r core."""
    qb, rb = lapack.qr(b)
    qa, ra = lapack.qr(a.T)
    u, s, vh = compact_svd(rb @ ra.T, floor)
    return qb @ u, s, vh @ qa.T


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal columns (or rows, if wide) to m: U Vᵀ of its SVD."""
    u, _, vh = svd(m, full_matrices=False)
    return u @ vh


def isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U diag(σ̄) Vᵀ with every singular value replaced by their mean (a flat spectrum)."""
    if s.numel() == 0:
        return torch.zeros(u.shape[0], vh.shape[1], dtype=u.dtype, device=u.device)
    return (u * s.mean()) @ vh


AUTO_FLOAT64_MAX = 2048  # precision "auto": float64 on the CPU up to this min(m, n), float32 above and on CUDA


def linalg_dtype(precision: str, shape: tuple[int, ...], device: torch.device) -> torch.dtype:
    if precision != "auto":
        return getattr(torch, precision)
    return torch.float64 if device.type == "cpu" and min(shape) <= AUTO_FLOAT64_MAX else torch.float32


def gram_dtype(device: torch.device) -> torch.dtype:
    """Gram matrices square the condition number: float64 on the CPU, float32 on CUDA."""
    return torch.float64 if device.type == "cpu" else torch.float32


def top_eig(gram: torch.Tensor, floor: float, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading (≤ limit) right singular vectors and values of a matrix from its Gram matrix,
    above the noise floor and what a Gram matrix resolves (√eps·σ_max)."""
    evals, v = lapack.eigh(gram)
    sigma, order = evals.clamp(min=0).sqrt().sort(descending=True)
    top = float(sigma[0]) if sigma.numel() else 0.0
    r = min(limit, int((sigma > max(floor, top * torch.finfo(gram.dtype).eps ** 0.5)).sum()))
    return v[:, order[:r]], sigma[:r]


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """(UᵀU)^(-1/2) from UᵀU (symmetric, positive definite on the columns kept)."""
    evals, v = lapack.eigh(gram)
    return (v * evals.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()) @ v.T
