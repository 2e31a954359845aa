"""iso_c: isotropic merging in the common subspace (Marczak et al., 2025).

Per 2-D tensor: Σ τ_i = U diag(σ) Vᵀ (compact, numerical rank r), every σ replaced by their mean:
W = W₀ + α · σ̄ U Vᵀ — the merged update has a flat spectrum. Tensors that are not 2-D get
W₀ + α · mean τ_i. (The authors average over all min(m, n) singular values; we over the
numerical rank, which is the same for full-rank sums and keeps arbitrary null directions out
for low-rank ones: math/spectral.py.) Whole tensors: the sum and its SVD; tall tensors larger
than one row block stream in blocks through the Gram matrix of the sum (`merge_tall`).
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
class IsoCParams:
    alpha: float = 1.0
    precision: str = "auto"  # as tsv

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        check_choice("precision", self.precision, PRECISIONS)


def merge_tall(task: TensorTask, params: IsoCParams, floor: float, block_sum=None) -> torch.Tensor:
    """A tall tensor larger than one block (embeddings, lm_head): from the Gram matrix SᵀS of the
    sum S = Σ τ_i (summed over row blocks; float64 on the CPU) = V diag(σ²) Vᵀ, since
    U σ̄ Vᵀ = S V diag(σ̄/σ) Vᵀ, each output block is W₀ + α S_blk V diag(σ̄/σ) Vᵀ: n×n matrices and
    a few blocks held, two reads of each expert. Directions below the floor, or below √eps·σ_max
    (what a Gram matrix resolves), are left out. `block_sum(rows)`: S of a row block (default
    Σ τ_i)."""
    blocks = task.row_blocks()
    gdtype = spectral.gram_dtype(task.base_rows(blocks[0]).device)
    block_sum = block_sum or (
        lambda rows: spectral_common.task_sum(task, rows)
    )  # ortho_svd passes its deconflicted sum
    gram = None
    for rows in blocks:
        s_blk = block_sum(rows).to(gdtype)
        gram = s_blk.T @ s_blk if gram is None else gram.addmm_(s_blk.T, s_blk)
        del s_blk
    v, sigma = spectral.top_eig(gram, floor, task.shape[1])
    del gram
    task.note("rank", int(sigma.numel()))
    if not sigma.numel():
        return map_row_blocks(task, lambda rows: task.base_rows(rows).clone())
    coef = (v * (sigma.mean() / sigma)) @ v.T  # V diag(σ̄/σ) Vᵀ
    del v

    def block(rows: Rows | None) -> torch.Tensor:
        update = block_sum(rows).to(gdtype) @ coef
        return task.base_rows(rows) + update.mul_(params.alpha).to(task.dtype)

    return map_row_blocks(task, block)


def merge_whole(task: TensorTask, params: IsoCParams, dtype: torch.dtype, floor: float) -> torch.Tensor:
    u, s, vh = spectral.compact_svd(spectral_common.task_sum(task).to(dtype), floor)
    task.note("rank", int(s.numel()))
    return task.base + spectral.isotropic(u, s, vh).mul_(params.alpha).to(task.base.dtype)


def memory(name: str, shape: tuple[int, ...], n: int, params, itemsize: int):
    """Tall tensors in blocks: three float64 blocks (the sum, the update) and two n×n float64
    matrices (Gram or eigenvectors, coef), fitted to measured peaks; others: `whole_memory`."""
    from .base import BLOCK_ELEMENTS

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) == 2 and numel > BLOCK_ELEMENTS and shape[0] >= shape[1]:
        return Need(int(3 * BLOCK_ELEMENTS * 8 + 2 * shape[1] ** 2 * 8), transfer=BLOCK_ELEMENTS)
    return whole_memory(name, shape, n, params, itemsize)


def whole_memory(name: str, shape: tuple[int, ...], n: int, params, itemsize: int):
    """The base, the sum, one τ, and the SVD of the sum (U, Vᵀ and LAPACK's workspace)."""

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) != 2:
        return Need(4 * numel * itemsize)
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    return Need(int(3 * numel * itemsize + lin * (3 * numel + min(m, k) * (m + k))))


METHOD = spectral_common.spectral_method("iso_c", IsoCParams, merge_tall, merge_whole, memory, __doc__ or "")
merge = METHOD.merge
