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


# -- what the spectral methods share (they receive a methods.TensorTask) --------------------------

AUTO_FLOAT64_MAX = 2048  # precision "auto": float64 on the CPU up to this min(m, n), float32 above and on CUDA


def linalg_dtype(precision: str, shape: tuple[int, ...], device: torch.device) -> torch.dtype:
    if precision != "auto":
        return getattr(torch, precision)
    return torch.float64 if device.type == "cpu" and min(shape) <= AUTO_FLOAT64_MAX else torch.float32


def check_precision(precision: str) -> None:
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"precision = {precision!r} must be 'auto', 'float32' or 'float64'")


def noise_floor(task) -> float:
    """4·eps·rms(W₀)·(√m + √n): the σ_max of W₀'s rounding errors in the task vectors' dtype."""
    m, n = task.shape
    base = task.base
    rms = float(base.double().square().mean().sqrt()) if base.numel() else 0.0
    return 4 * torch.finfo(task.dtype).eps * rms * (m**0.5 + n**0.5)


def setup(task, precision: str) -> tuple[torch.dtype, float]:
    """(the linear-algebra dtype, the noise floor) of one 2-D tensor's merge."""
    return linalg_dtype(precision, task.shape, task.base.device), noise_floor(task)


def task_svd(task, i: int, dtype: torch.dtype, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compact_svd(τ_i), from a LoRA expert's factors when it has them."""
    factors = task.task_factors(i)
    if factors is not None:
        b, a = factors
        if b.shape[1] == 0:
            return b.to(dtype), torch.zeros(0, dtype=dtype, device=b.device), a.to(dtype)
        return low_rank_svd(b.to(dtype), a.to(dtype), floor)
    return compact_svd(task.task_vector(i).to(dtype), floor)


def task_sum(task, rows=None) -> torch.Tensor:
    """Σ τ_i (of a row block, if given), one expert at a time."""
    total = task.task_vector(0, rows)
    for i in range(1, len(task.weights)):
        total.add_(task.task_vector(i, rows))
    return total


def mean_update(task, alpha: float) -> torch.Tensor:
    """W₀ + α · mean τ_i: what every spectral method does with tensors that are not 2-D."""
    return task.base + task_sum(task).mul_(alpha / len(task.weights))


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


def expert_right_vectors(task, floor: float, limit: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each τ_i's leading right singular vectors and values from its Gram matrix τ_iᵀτ_i, summed
    over row blocks, one expert at a time (one read of each)."""
    cols = task.shape[1]
    out = []
    for i in range(len(task.weights)):
        gram = None
        for rows in task.row_blocks():
            t = task.task_vector(i, rows).to(dtype)
            gram = t.T @ t if gram is None else gram.addmm_(t.T, t)
            del t
        out.append(top_eig(gram if gram is not None else torch.zeros(cols, cols, dtype=dtype), floor, limit))
        del gram
    return out


def streams_tall(task) -> bool:
    """A tall 2-D tensor larger than one row block: merged through Gram matrices, block by block."""
    return task.row_blocks() != [None] and task.shape[0] >= task.shape[1]


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """(UᵀU)^(-1/2) from UᵀU (symmetric, positive definite on the columns kept)."""
    evals, v = lapack.eigh(gram)
    return (v * evals.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()) @ v.T


def polar_blocks(task, left, vhs: list[torch.Tensor], sigma: torch.Tensor, alpha: float):
    """W₀ + α · polar(L) diag(σ) polar(Vᵀ) for a tall tensor whose concatenated left vectors L
    come block by block from `left(rows)`: polar(L) = L (LᵀL)^(-1/2), LᵀL summed over the
    blocks (one pass), then the output blocks (another)."""
    from ..methods import map_row_blocks

    ltl = None
    for rows in task.row_blocks():
        lb = left(rows)
        ltl = lb.T @ lb if ltl is None else ltl.addmm_(lb.T, lb)
        del lb
    right = (inverse_sqrt(ltl) * sigma) @ polar_factor(torch.cat(vhs, dim=0))
    del ltl
    return map_row_blocks(task, lambda rows: task.base_rows(rows) + (left(rows) @ right).mul_(alpha).to(task.dtype))


def dispatch(task, alpha: float, precision: str, tall, whole):
    """The shape of every spectral method: not 2-D → W₀ + α·mean τ_i; tall and larger than a
    block → `tall(floor)`; otherwise `whole(dtype, floor)`."""
    if len(task.shape) != 2:
        return mean_update(task, alpha)
    if streams_tall(task):
        return tall(noise_floor(task))
    return whole(*setup(task, precision))
