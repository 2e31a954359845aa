"""Cayley maps between so(n) and SO(n).

Convention of this project (the OrthoMerge paper, eq. 2 and 5):
    cayley(Q)         R = (I + Q)(I − Q)⁻¹      — defined for every skew Q
    inverse_cayley(R) Q = (R − I)(R + I)⁻¹      — singular where R has an eigenvalue −1
The two factors of each product commute, so each is computed as one linear solve.

PEFT's *exact* OFT branch uses the opposite sign, R = (I − Q)(I + Q)⁻¹ = cayley(−Q), while its
Cayley–Neumann branch approximates cayley(+Q). `peft_rotation` reproduces both per version.
"""

from __future__ import annotations

import torch

from . import lapack


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ = (I − Q)⁻¹(I + Q) for skew Q (batched over leading dims)."""
    eye = _eye_like(q)
    return lapack.solve(eye - q, eye + q)


def cayley_consuming(q: torch.Tensor) -> torch.Tensor:
    """cayley(Q) for one large skew matrix, overwriting Q: R = 2(I − Q)⁻¹ − I (the same map,
    since I + Q = 2I − (I − Q)), in about three k×k buffers instead of six."""
    a = q.neg_()
    a.diagonal().add_(1.0)  # I − Q; its singular values are ≥ 1, so the inverse is well conditioned
    r = lapack.inv(a)
    del a
    r.mul_(2.0).diagonal().sub_(1.0)
    return r


def inverse_cayley(r: torch.Tensor) -> torch.Tensor:
    """Q = (R + I)⁻¹(R − I), skew-symmetrised. Raises ValueError if R + I is singular
    (an eigenvalue −1, e.g. a reflection): callers must have excluded that (see procrustes)."""
    eye = _eye_like(r)
    q, info = lapack.solve_ex(r + eye, r - eye)
    if bool((info != 0).any()) or not bool(torch.isfinite(q).all()):
        raise ValueError("inverse Cayley: R has an eigenvalue at -1")
    return 0.5 * (q - q.transpose(-1, -2))


def cayley_neumann(q: torch.Tensor, terms: int, coefficients: str = "peft>=0.18") -> torch.Tensor:
    """PEFT's truncated Neumann approximation of (I + Q)(I − Q)⁻¹, term for term as PEFT sums it.

    PEFT ≥ 0.18: I + 2Q + 2Q² + 2Q³ … + 2Q^{t−2} + Q^{t−1} for t ≥ 4 terms; its loop gives
                 I + 2Q + 2Q² + Q³ for t = 3 as well (mirrored, since adapters were trained so).
    PEFT 0.16–0.17 ("peft0.16"): I + 2Q + 2Q² + … + 2Q^{t−1}.
    Only approximately orthogonal; that is what the adapter was trained with.
    """
    if coefficients not in ("peft>=0.18", "peft0.16"):
        raise ValueError(f"unknown Neumann coefficients {coefficients!r}")
    r = _eye_like(q).clone()
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            if coefficients == "peft0.16":
                for _ in range(3, terms):
                    power = power @ q
                    r = r + 2.0 * power
            else:
                for _ in range(3, terms - 1):
                    power = power @ q
                    r = r + 2.0 * power
                r = r + power @ q
    return r


def peft_rotation(
    q: torch.Tensor, use_cayley_neumann: bool, terms: int = 5, coefficients: str = "peft>=0.18"
) -> torch.Tensor:
    """The block rotation PEFT builds from generator Q: exact branch cayley(−Q), Neumann ≈ cayley(+Q)."""
    if use_cayley_neumann:
        return cayley_neumann(q, terms, coefficients)
    return cayley(-q)
