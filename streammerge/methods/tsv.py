"""tsv: Task Singular Vectors merging, TSV-M (Gargiulo et al., 2025).

Per 2-D tensor [m, n] and N experts: each τ_i keeps its top ⌊min(m, n)/N⌋ singular triplets
(fewer if its rank is lower: a LoRA expert's SVD comes from its factors); the kept left vectors
are concatenated, U = [U_1 … U_N], and so are the right ones, Vᵀ = [V_1ᵀ; …; V_Nᵀ]; each is
replaced by its polar factor (the nearest orthonormal basis, which removes the interference
between experts' subspaces); W = W₀ + α · U⊥ diag(σ_1 … σ_N) V⊥ᵀ. Tensors that are not 2-D get
W₀ + α · mean τ_i (the authors: the mean, α = 1). Whole tensors: one τ at a time, the kept
triplets of all experts, then the two polar factors; tall tensors larger than one row block
(embeddings, lm_head) stream through Gram matrices (`merge_tall`).
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
    map_row_blocks,
)


@dataclass(frozen=True)
class TsvParams:
    alpha: float = 1.0
    precision: str = "auto"  # SVDs in float64 on the CPU up to min(m, n) = 2048, float32 above and on CUDA

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        check_choice("precision", self.precision, PRECISIONS)


def merge_tall(task: TensorTask, params: TsvParams, floor: float) -> torch.Tensor:
    """A tall tensor larger than one block, in three reads of the experts and n×n matrices:
    each τ_i's right singular vectors and σ from its Gram matrix τ_iᵀτ_i; the left ones are
    U_i = τ_i V_i σ_i⁻¹ (row-local); the polar factor of U = [U_1 … U_N] is U (UᵀU)^(-1/2), with
    UᵀU summed over blocks; the output block is W₀ + α U_blk (UᵀU)^(-1/2) diag(σ) V⊥ᵀ."""
    blocks = task.row_blocks()
    n = len(task.weights)
    device = task.base_rows(blocks[0]).device
    gdtype = spectral.gram_dtype(device)
    keep = max(1, min(task.shape) // n)
    lead = spectral_common.expert_right_vectors(task, floor, keep, gdtype)  # read 1: V_i, σ_i
    vs, sigmas = [v for v, _ in lead], [s for _, s in lead]
    s_all = torch.cat(sigmas)
    task.note("kept_rank", int(s_all.numel()))
    if s_all.numel() == 0:
        return map_row_blocks(task, lambda rows: task.base_rows(rows).clone())
    proj = [v / s for v, s in zip(vs, sigmas)]  # τ_i V_i σ_i⁻¹ = U_i

    def left(rows: Rows | None) -> torch.Tensor:
        return torch.cat([task.task_vector(i, rows).to(gdtype) @ proj[i] for i in range(n)], dim=1)

    return spectral_common.polar_blocks(task, left, [v.T for v in vs], s_all, params.alpha)  # reads 2 and 3


def merge_whole(task: TensorTask, params: TsvParams, dtype: torch.dtype, floor: float) -> torch.Tensor:
    n = len(task.weights)
    keep = max(1, min(task.shape) // n)
    us, ss, vhs = [], [], []
    for i in range(n):
        u, s, vh = spectral_common.task_svd(task, i, dtype, floor)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
        del u, s, vh
    s = torch.cat(ss)
    if s.numel() == 0:
        return task.base.clone()
    task.note("kept_rank", int(s.numel()))
    u = spectral.polar_factor(torch.cat(us, dim=1))
    vh = spectral.polar_factor(torch.cat(vhs, dim=0))
    return task.base + ((u * s) @ vh).mul_(params.alpha).to(task.base.dtype)


def memory(name: str, shape: tuple[int, ...], n: int, params: TsvParams, itemsize: int):
    """The base, one τ and its SVD, the kept factors (≤ min(m, n) columns of m + n each) and their
    polar factors, in the linear-algebra dtype (8 bytes where float64 may be chosen)."""

    from .base import BLOCK_ELEMENTS

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) != 2:
        return Need(4 * numel * itemsize)
    if numel > BLOCK_ELEMENTS and shape[0] >= shape[1]:  # merge_tall: blocks, n×n matrices
        return Need(int(8 * BLOCK_ELEMENTS * 8 + 6 * shape[1] ** 2 * 8), transfer=BLOCK_ELEMENTS)
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    r = min(m, k)
    return Need(int(3 * numel * itemsize + lin * (2 * numel + 3 * r * (m + k) + r * r)))


METHOD = spectral_common.spectral_method("tsv", TsvParams, merge_tall, merge_whole, memory, __doc__ or "")
merge = METHOD.merge
