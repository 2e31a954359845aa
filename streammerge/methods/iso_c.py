"""iso_c: isotropic merging in the common subspace (Marczak et al., 2025).

Per 2-D tensor: Σ τ_i = U diag(σ) Vᵀ (compact, numerical rank r), every σ replaced by their mean:
W = W₀ + α · σ̄ U Vᵀ — the merged update has a flat spectrum. Tensors that are not 2-D get
W₀ + α · mean τ_i. (The authors average over all min(m, n) singular values; we over the
numerical rank, which is the same for full-rank sums and keeps arbitrary null directions out
for low-rank ones: math/spectral.py.) Whole tensors: the sum and its SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from . import Method, TensorTask, check_finite, register


@dataclass(frozen=True)
class IsoCParams:
    alpha: float = 1.0
    precision: str = "auto"  # as tsv

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        spectral.check_precision(self.precision)


def summed(task: TensorTask) -> torch.Tensor:
    total = None
    for i in range(len(task.weights)):
        tau = task.task_vector(i)
        total = tau if total is None else total.add_(tau)
        del tau
    return total  # type: ignore[return-value]


def merge(task: TensorTask, params: IsoCParams) -> torch.Tensor:
    if len(task.shape) != 2:
        return spectral.mean_update(task, params.alpha)
    dtype = spectral.linalg_dtype(params.precision, task.shape, task.base.device)
    floor = spectral.noise_floor(task)
    u, s, vh = spectral.compact_svd(summed(task).to(dtype), floor)
    task.note("rank", int(s.numel()))
    return task.base + spectral.isotropic(u, s, vh).mul_(params.alpha).to(task.base.dtype)


def memory(name: str, shape: tuple[int, ...], n: int, params, itemsize: int):
    """The base, the sum, one τ, and the SVD of the sum (U, Vᵀ and LAPACK's workspace)."""
    from ..plan import Need

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) != 2:
        return Need(4 * numel * itemsize)
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    return Need(int(3 * numel * itemsize + lin * (3 * numel + min(m, k) * (m + k))))


register(Method("iso_c", IsoCParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={}))
