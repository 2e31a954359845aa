"""ties: trim, elect sign, disjoint merge (Yadav et al., 2023).

Each task vector keeps its top `density` fraction by magnitude — per tensor (mergekit) or over
the expert's whole flattened model (`scope="model"`, the paper, fusion-bench and the OrthoMerge
authors). The sign of Σ w_i τ̂_i is elected per entry (entries summing to 0 take the tensor's
majority sign, +1 on a tie); entries agreeing with it are averaged (`merge="mean"`, disjoint
mean) or summed; the result is W_0 + λ · merged. Streams in two passes over the experts.

Model scope needs each expert's exact k-th largest |τ| over the model. It is found without
holding the model by a two-pass radix select on the bits of float32 magnitudes (non-negative
floats order like their int32 bit patterns): pass 1 histograms the high 16 bits, pass 2 the low
16 bits inside the bin that holds the k-th value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, ModelPass, TensorTask, check_range, elementwise_memory, register


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    lambda_: float = 1.0
    merge: str = "mean"  # disjoint "mean" (paper) or "sum" (fusion-bench)
    scope: str = "tensor"  # where the top-k is taken: "tensor" or "model"

    def __post_init__(self) -> None:
        check_range("density", self.density, 0.0, 1.0, low_open=True)
        check_range("lambda", self.lambda_, 0.0, float("inf"))
        if self.merge not in ("mean", "sum"):
            raise ValueError(f"merge = {self.merge!r} must be 'mean' or 'sum'")
        if self.scope not in ("tensor", "model"):
            raise ValueError(f"scope = {self.scope!r} must be 'tensor' or 'model'")


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ⌊numel·density⌋, at least one."""
    return max(1, min(numel, int(numel * density)))


def magnitude(tau: torch.Tensor) -> torch.Tensor:
    """|τ| in float32: the values thresholds are found in and compared against."""
    return tau.abs().to(torch.float32)


def tensor_threshold(tau: torch.Tensor, density: float) -> float:
    """The k-th largest |τ| of one tensor; entries with |τ| ≥ it are kept."""
    mag = magnitude(tau).reshape(-1)
    k = keep_count(mag.numel(), density)
    return float(mag.kthvalue(mag.numel() - k + 1).values)


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    return tau.mul_(magnitude(tau) >= threshold)


def elect_sign(total: torch.Tensor) -> torch.Tensor:
    sign = torch.sign(total)
    majority = 1.0 if float(sign.sum()) >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(task: TensorTask, vectors, merge_kind: str) -> torch.Tensor:
    """Sign election then disjoint mean/sum over `vectors(i)` (the processed task vectors)."""
    n = len(task.weights)
    total = torch.zeros_like(task.base)
    for i in range(n):
        total.add_(vectors(i))
    sign = elect_sign(total)
    total.zero_()
    count = torch.zeros_like(task.base)
    for i in range(n):
        v = vectors(i)
        agree = (torch.sign(v) == sign) & (v != 0)
        total.add_(v * agree)
        count.add_(agree)
    if merge_kind == "mean":
        total.div_(count.clamp_(min=1))
    return total


def thresholds_for(task: TensorTask, params: TiesParams) -> list[float]:
    if params.scope == "model":
        return list(task.statistics)
    return [tensor_threshold(task.task_vector(i), _density(task, params, i)) for i in range(len(task.weights))]


def _density(task: TensorTask, params: TiesParams, i: int) -> float:
    d = task.densities[i] if task.densities and task.densities[i] is not None else params.density
    return float(d)


def merge(task: TensorTask, params: TiesParams) -> torch.Tensor:
    thresholds = thresholds_for(task, params)

    def trimmed(i: int) -> torch.Tensor:
        return trim(task.task_vector(i), thresholds[i]).mul_(task.weights[i])

    return task.base + params.lambda_ * disjoint_merge(task, trimmed, params.merge)


def model_thresholds(model_pass: ModelPass, n_experts: int, densities: list[float]) -> list[float]:
    """Each expert's exact k-th largest |τ| over all of its tensors (radix select, two passes)."""
    high = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_experts)]
    total = 0
    for _, base, experts in model_pass():
        total += base.numel()
        for i in range(n_experts):
            bits = magnitude(experts[i].sub_(base)).view(torch.int32).reshape(-1)
            high[i] += torch.bincount(bits >> 16, minlength=1 << 16).cpu()
    targets = []  # (high bits of the k-th value, its rank from the top inside that bin)
    for i in range(n_experts):
        k = keep_count(total, densities[i])
        from_top = high[i].flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(k)))
        hi = (1 << 16) - 1 - j
        above = int(from_top[j]) - int(high[i][hi])
        targets.append((hi, k - above))
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_experts)]
    for _, base, experts in model_pass():
        for i in range(n_experts):
            bits = magnitude(experts[i].sub_(base)).view(torch.int32).reshape(-1)
            in_bin = bits[(bits >> 16) == targets[i][0]]
            low[i] += torch.bincount(in_bin & 0xFFFF, minlength=1 << 16).cpu()
    result = []
    for i in range(n_experts):
        hi, rank = targets[i]
        from_top = low[i].flip(0).cumsum(0)
        lo = (1 << 16) - 1 - int(torch.searchsorted(from_top, torch.tensor(rank)))
        bits = torch.tensor([(hi << 16) | lo], dtype=torch.int32)
        result.append(float(bits.view(torch.float32)[0]))
    return result


def statistics(model_pass: ModelPass, n_experts: int, params: TiesParams, densities: list[float] | None = None):
    if params.scope != "model":
        return None
    return model_thresholds(model_pass, n_experts, densities or [params.density] * n_experts)


register(
    Method(
        "ties", TiesParams, merge,
        memory=lambda name, shape, n, p, item: elementwise_memory(8.0 if p.scope == "tensor" else 9.3)(name, shape, n, p, item),
        statistics=statistics,
        statistics_passes=lambda p: 2 if p.scope == "model" else 0,
        doc=__doc__ or "",
    )
)
