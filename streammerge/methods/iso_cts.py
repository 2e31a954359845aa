"""iso_cts: isotropic merging in common and task-specific subspaces (Marczak et al., 2025).

Per 2-D tensor [m, n], with r = min(m, n) (capped by the numerical ranks): the common subspace is
the top c = ⌊common_fraction · r⌋ singular triplets of Σ τ_i; each expert then fills
s = ⌊(r − c)/N⌋ slots with the top triplets of its residual τ_i − U_c U_cᵀ τ_i; the concatenated
left and right vectors are replaced by their polar factors, every singular value (common and
task-specific) by their mean σ̄: W = W₀ + α · σ̄ U⊥ V⊥ᵀ. Tensors that are not 2-D get
W₀ + α · mean τ_i. Whole tensors: the sum, one τ, and the kept factors; tall tensors larger
than one row block stream through Gram matrices (`merge_tall`), and so do wide tensors above
spectral_common.WIDE_GRAM_ELEMENTS (`merge_wide`: m×m Gram matrices, one expert at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from ..plan import Need
from . import spectral_common
from .base import (
    check_choice,
    PRECISIONS,
    Rows,
    TensorTask,
    check_finite,
    check_range,
    map_row_blocks,
)
from .iso_c import whole_memory as iso_memory


@dataclass(frozen=True)
class IsoCtsParams:
    alpha: float = 1.0
    common_fraction: float = 0.8
    precision: str = "auto"  # as tsv

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        check_range("common_fraction", self.common_fraction, 0.0, 1.0)
        check_choice("precision", self.precision, PRECISIONS)


def merge_tall(task: TensorTask, params: IsoCtsParams, floor: float) -> torch.Tensor:
    """A tall tensor larger than one block, in four passes over the blocks and n×n matrices:
    the Gram matrices of Σ τ_i and of each τ_i; the common right vectors V_c, σ_c and
    U_c = S V_c σ_c⁻¹ (row-local); P_i = U_cᵀ τ_i summed over blocks, so the residual
    τ_i − U_c P_i has Gram matrix τ_iᵀτ_i − P_iᵀP_i and left vectors (τ_i − U_c P_i) V_i σ_i⁻¹;
    the polar factor of the concatenated left vectors L through LᵀL; then the output blocks."""
    blocks = task.row_blocks()
    n, cols = len(task.weights), task.shape[1]
    device = task.base_rows(blocks[0]).device
    g = spectral.gram_dtype(device)
    taus = lambda rows: [task.task_vector(i, rows).to(g) for i in range(n)]  # noqa: E731
    gram_sum = torch.zeros(cols, cols, dtype=g, device=device)
    grams = [torch.zeros(cols, cols, dtype=g, device=device) for _ in range(n)]
    for rows in blocks:  # pass 1
        ts = taus(rows)
        s_blk = sum(ts)
        gram_sum.addmm_(s_blk.T, s_blk)
        for gi, t in zip(grams, ts):
            gi.addmm_(t.T, t)
        del ts, s_blk
    rank = min(task.shape)
    v_c, s_c = spectral.top_eig(gram_sum, floor, int(rank * params.common_fraction))
    del gram_sum
    proj_c = v_c / s_c  # S V_c σ_c⁻¹ = U_c
    slots = (rank - s_c.numel()) // n
    ps = [torch.zeros(s_c.numel(), cols, dtype=g, device=device) for _ in range(n)]
    if slots:
        for rows in blocks:  # pass 2: P_i = U_cᵀ τ_i
            ts = taus(rows)
            u_c = sum(ts) @ proj_c
            for p, t in zip(ps, ts):
                p.addmm_(u_c.T, t)
            del ts, u_c
    specific = [
        spectral.top_eig(gi - p.T @ p, floor, slots) if slots else (v_c[:, :0], s_c[:0]) for gi, p in zip(grams, ps)
    ]
    del grams
    s_all = torch.cat([s_c] + [s for _, s in specific])
    task.note("kept_rank", int(s_all.numel()))
    if s_all.numel() == 0:
        return map_row_blocks(task, lambda rows: task.base_rows(rows).clone())

    def left(rows: Rows | None) -> torch.Tensor:  # [U_c, U_1, …, U_N] of the block
        ts = taus(rows)
        u_c = sum(ts) @ proj_c
        parts = [u_c] + [(t - u_c @ p) @ (v / s) for t, p, (v, s) in zip(ts, ps, specific)]
        return torch.cat(parts, dim=1)

    vhs = [v_c.T] + [v.T for v, _ in specific]
    return spectral_common.polar_blocks(task, left, vhs, s_all.mean().expand_as(s_all), params.alpha)  # passes 3 and 4


def merge_wide(task: TensorTask, params: IsoCtsParams, floor: float) -> torch.Tensor:
    """A wide tensor [m, n] (m < n) through m×m Gram matrices (float64 on the CPU), one expert at
    a time: S = Σ τ_i gives U_c, σ_c from SSᵀ and V_c = SᵀU_c σ_c⁻¹; each residual
    R_i = τ_i − U_c U_cᵀ τ_i gives U_i, σ_i from R_i R_iᵀ (projected from τ_iτ_iᵀ) and
    V_i = R_iᵀ U_i σ_i⁻¹ = τ_iᵀ(I − U_c U_cᵀ)U_i σ_i⁻¹ (one pass over τ_i for each);
    polar(U) by an SVD of U [m, r], polar(Vᵀ) = (VᵀV)^(-1/2) Vᵀ. Held: the sum or one τ_i, the
    right vectors V [n, r ≤ m] and m×m matrices; float64 conversions one column chunk at a time."""
    n_exp, (m, n) = len(task.weights), task.shape
    chunks = spectral_common.column_chunks(task.shape)
    total = spectral_common.task_sum(task)
    g = spectral.gram_dtype(total.device)

    def gram_of(x: torch.Tensor) -> torch.Tensor:
        gram = torch.zeros(m, m, dtype=g, device=x.device)
        for c in chunks:
            blk = x[:, c].to(g)
            gram.addmm_(blk, blk.T)
        return gram

    u_c, s_c = spectral.top_eig(gram_of(total), floor, int(m * params.common_fraction))
    slots = (m - s_c.numel()) // n_exp
    v = torch.empty(n, s_c.numel() + n_exp * slots, dtype=g, device=total.device)
    for c in chunks:
        v[c, : s_c.numel()] = (total[:, c].to(g).T @ u_c).div_(s_c)
    del total
    us, ss, col = [u_c], [s_c], s_c.numel()
    for i in range(n_exp if slots else 0):
        tau = task.task_vector(i)
        gram = gram_of(tau)  # R Rᵀ = (I − U_c U_cᵀ) τ τᵀ (I − U_c U_cᵀ), as merge_tall's τᵀτ − PᵀP
        gram.sub_(u_c @ (u_c.T @ gram))
        gram.sub_((gram @ u_c) @ u_c.T)
        u_i, s_i = spectral.top_eig(gram, floor, slots)
        del gram
        right = (u_i - u_c @ (u_c.T @ u_i)).div_(s_i)  # V_i = Rᵀ U_i σ_i⁻¹ = τᵀ (I − U_c U_cᵀ) U_i σ_i⁻¹
        for c in chunks:
            v[c, col : col + s_i.numel()] = tau[:, c].to(g).T @ right
        del tau
        us.append(u_i), ss.append(s_i)
        col += s_i.numel()
    v = v[:, :col]
    s_all = torch.cat(ss)
    task.note("kept_rank", int(s_all.numel()))
    if s_all.numel() == 0:
        return task.base.clone()
    coef = (spectral.polar_factor(torch.cat(us, dim=1)) * s_all.mean()) @ spectral.inverse_sqrt(v.T @ v)
    out = torch.empty_like(task.base)
    for c in chunks:
        out[:, c] = task.base[:, c] + (coef @ v[c].T).mul_(params.alpha).to(task.base.dtype)
    return out


def merge_whole(task: TensorTask, params: IsoCtsParams, dtype: torch.dtype, floor: float) -> torch.Tensor:
    n = len(task.weights)
    u, s, vh = spectral.compact_svd(spectral_common.task_sum(task).to(dtype), floor)
    rank = min(task.shape)
    c = min(int(rank * params.common_fraction), s.numel())
    us, ss, vhs = [u[:, :c]], [s[:c]], [vh[:c]]
    uc = u[:, :c]
    del u, s, vh
    slots = (rank - c) // n
    if slots:
        for i in range(n):
            tau = task.task_vector(i).to(dtype)
            tau -= uc @ (uc.T @ tau)
            ui, si, vhi = spectral.compact_svd(tau, floor)
            del tau
            us.append(ui[:, :slots])
            ss.append(si[:slots])
            vhs.append(vhi[:slots])
    s_all = torch.cat(ss)
    task.note("kept_rank", int(s_all.numel()))
    if s_all.numel() == 0:
        return task.base.clone()
    u_perp = spectral.polar_factor(torch.cat(us, dim=1))
    vh_perp = spectral.polar_factor(torch.cat(vhs, dim=0))
    return task.base + spectral.isotropic(u_perp, s_all, vh_perp).mul_(params.alpha).to(task.base.dtype)


def memory(name: str, shape: tuple[int, ...], n: int, params: IsoCtsParams, itemsize: int):
    """iso_c's, plus the concatenated factors and their polar factors (≤ min(m, n) columns);
    tall tensors in blocks: N + 4 float64 n×n matrices and about N + 4 float64 blocks."""
    from .base import BLOCK_ELEMENTS

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) == 2 and numel > BLOCK_ELEMENTS and shape[0] >= shape[1]:
        return Need(int((n + 4) * BLOCK_ELEMENTS * 8 + (n + 4) * shape[1] ** 2 * 8), transfer=BLOCK_ELEMENTS)
    if len(shape) == 2 and shape[0] < shape[1] and numel > spectral_common.WIDE_GRAM_ELEMENTS:
        m, k = shape  # merge_wide: base, sum or τ, result; V [n, m] float64; m×m solves; chunks (fitted)
        return Need(int(3 * numel * itemsize + k * m * 8 + 4 * m * m * 8 + 2 * BLOCK_ELEMENTS * 8))
    need = iso_memory(name, shape, n, params, itemsize)
    if len(shape) != 2:
        return need
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    return Need(need.work + lin * 4 * min(m, k) * (m + k))  # 4: the factors, their polar SVDs (measured)


METHOD = spectral_common.spectral_method(
    "iso_cts", IsoCtsParams, merge_tall, merge_whole, memory, __doc__ or "", wide=merge_wide
)
merge = METHOD.merge
