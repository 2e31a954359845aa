"""tsv: Task Singular Vectors merging, TSV-M (Gargiulo et al., 2025).

Per 2-D tensor [m, n] and N experts: each τ_i keeps its top ⌊min(m, n)/N⌋ singular triplets
(fewer if its rank is lower: a LoRA expert's SVD comes from its factors); the kept left vectors
are concatenated, U = [U_1 … U_N], and so are the right ones, Vᵀ = [V_1ᵀ; …; V_Nᵀ]; each is
replaced by its polar factor (the nearest orthonormal basis, which removes the interference
between experts' subspaces); W = W₀ + α · U⊥ diag(σ_1 … σ_N) V⊥ᵀ. Tensors that are not 2-D get
W₀ + α · mean τ_i (the authors: the mean, α = 1). Whole tensors: one τ at a time, the kept
triplets of all experts, then the two polar factors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from . import Method, TensorTask, check_finite, register


@dataclass(frozen=True)
class TsvParams:
    alpha: float = 1.0
    precision: str = "auto"  # SVDs in float64 on the CPU up to min(m, n) = 2048, float32 above and on CUDA

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        spectral.check_precision(self.precision)


def merge(task: TensorTask, params: TsvParams) -> torch.Tensor:
    if len(task.shape) != 2:
        return spectral.mean_update(task, params.alpha)
    n = len(task.weights)
    dtype = spectral.linalg_dtype(params.precision, task.shape, task.base.device)
    floor = spectral.noise_floor(task)
    keep = max(1, min(task.shape) // n)
    us, ss, vhs = [], [], []
    for i in range(n):
        u, s, vh = spectral.task_svd(task, i, dtype, floor)
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
    from ..plan import Need

    numel = 1
    for d in shape:
        numel *= d
    if len(shape) != 2:
        return Need(4 * numel * itemsize)
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    r = min(m, k)
    return Need(int(3 * numel * itemsize + lin * (2 * numel + 3 * r * (m + k) + r * r)))


register(Method("tsv", TsvParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={}))
