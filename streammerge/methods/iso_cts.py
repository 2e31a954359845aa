"""iso_cts: isotropic merging in common and task-specific subspaces (Marczak et al., 2025).

Per 2-D tensor [m, n], with r = min(m, n) (capped by the numerical ranks): the common subspace is
the top c = ⌊common_fraction · r⌋ singular triplets of Σ τ_i; each expert then fills
s = ⌊(r − c)/N⌋ slots with the top triplets of its residual τ_i − U_c U_cᵀ τ_i; the concatenated
left and right vectors are replaced by their polar factors, every singular value (common and
task-specific) by their mean σ̄: W = W₀ + α · σ̄ U⊥ V⊥ᵀ. Tensors that are not 2-D get
W₀ + α · mean τ_i. Whole tensors: the sum, one τ, and the kept factors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import spectral
from . import Method, TensorTask, check_finite, check_range, register
from .iso_c import whole_memory as iso_memory
from .iso_c import summed


@dataclass(frozen=True)
class IsoCtsParams:
    alpha: float = 1.0
    common_fraction: float = 0.8
    precision: str = "auto"  # as tsv

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        check_range("common_fraction", self.common_fraction, 0.0, 1.0)
        spectral.check_precision(self.precision)


def merge(task: TensorTask, params: IsoCtsParams) -> torch.Tensor:
    if len(task.shape) != 2:
        return spectral.mean_update(task, params.alpha)
    n = len(task.weights)
    dtype, floor = spectral.setup(task, params.precision)
    u, s, vh = spectral.compact_svd(summed(task).to(dtype), floor)
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
    """iso_c's, plus the concatenated factors and their polar factors (≤ min(m, n) columns)."""
    from ..plan import Need

    need = iso_memory(name, shape, n, params, itemsize)
    if len(shape) != 2:
        return need
    lin = 8 if params.precision != "float32" and min(shape) <= spectral.AUTO_FLOAT64_MAX else 4
    m, k = shape
    return Need(need.work + lin * 4 * min(m, k) * (m + k))  # 4: the factors, their polar SVDs (measured)


register(Method("iso_cts", IsoCtsParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={}))
