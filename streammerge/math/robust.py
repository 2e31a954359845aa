"""Linear algebra that cannot take a merge down.

LAPACK's divide-and-conquer SVD (and cuSOLVER's) can fail to converge on matrices whose
singular values cluster, which is exactly what a near-orthogonal matrix is: the polar factors
that Procrustes completions and angle resets need (all σ ≈ 1, widths up to 8192 at 8B shapes)
crashed 12–17-minute merges. So:
* `polar(m)` takes the orthogonal polar factor U Vᵀ of a near-orthogonal matrix by Newton–Schulz
  iterations, X ← X (3I − XᵀX)/2, matrix products only, which converge quadratically there
  (they converge for singular values in (0, √3); we start them only when ‖XᵀX − I‖₂ < 0.9) and by an SVD otherwise;
* `svd(m)` retries a failed SVD with another driver (CUDA), then in float64, then on a copy
  scaled to unit norm; if every attempt fails it raises `LinalgFailure`, which the method turns
  into a one-line error naming the tensor.
"""

from __future__ import annotations

import torch

from . import lapack


class LinalgFailure(RuntimeError):
    """Every way of computing a factorisation failed (the caller names the tensor)."""


def svd(m: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd with fallbacks; the factors come back in m's dtype."""
    attempts = [lambda: lapack.svd(m, full_matrices=full_matrices)]
    if m.is_cuda:
        attempts.append(lambda: lapack.svd(m, full_matrices=full_matrices, driver="gesvd"))
    if m.dtype != torch.float64:
        attempts.append(lambda: tuple(f.to(m.dtype) for f in lapack.svd(m.double(), full_matrices=full_matrices)))

    def scaled():
        norm = float(torch.linalg.matrix_norm(m.double(), ord="fro")) or 1.0
        u, s, vh = lapack.svd(m.double() / norm, full_matrices=full_matrices)
        return u.to(m.dtype), (s * norm).to(m.dtype), vh.to(m.dtype)

    attempts.append(scaled)
    errors = []
    for attempt in attempts:
        try:
            return attempt()  # type: ignore[return-value]
        except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
            errors.append(str(exc).splitlines()[0])
    raise LinalgFailure(
        f"SVD of a {list(m.shape)} {str(m.dtype).removeprefix('torch.')} matrix did not converge ({errors[0]})"
    )


def _spectral_norm_estimate(sym: torch.Tensor, steps: int = 30) -> float:
    """‖sym‖₂ of a symmetric matrix by power iteration from a fixed start (a lower bound that
    is tight after a few dozen steps; the iteration below is watched anyway)."""
    v = torch.ones(sym.shape[0], dtype=sym.dtype, device=sym.device)
    v /= torch.linalg.vector_norm(v)
    est = 0.0
    for _ in range(steps):
        w = sym @ v
        est = float(torch.linalg.vector_norm(w))
        if est == 0.0:
            return 0.0
        v = w / est
    return est


def newton_schulz_polar(m: torch.Tensor, max_steps: int = 60) -> torch.Tensor | None:
    """The polar factor of `m` when its singular values lie near 1 (‖mᵀm − I‖₂ < 0.9), else
    None. Iterates until the orthogonality defect stops shrinking; None as well if it did not
    reach round-off (the caller then takes the SVD)."""
    n = m.shape[-1]
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    x = m
    g = x.T @ x
    if not _spectral_norm_estimate(g - eye) < 0.9:
        return None
    defect = float(torch.linalg.matrix_norm(g - eye))
    floor = 8 * torch.finfo(m.dtype).eps * n**0.5
    for _ in range(max_steps):
        x = x @ (1.5 * eye - 0.5 * g)
        g = x.T @ x
        new = float(torch.linalg.matrix_norm(g - eye))
        if new <= floor:
            return x
        if not new < 0.5 * defect:  # no longer converging quadratically: at round-off, or diverging
            break
        defect = new
    return x if new <= 100 * floor else None


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of a square matrix m = U Σ Vᵀ."""
    x = newton_schulz_polar(m)
    if x is not None:
        return x
    u, _, vh = svd(m)
    return u @ vh
