"""ramplus_tl: Reinforced Agent Merging Plus, tensor-local (arXiv 2601.13572; mergekit 0.1.5's
`ramplus_tl`). As ram, but expert i's unique entries are scaled by λ_i = 1 + r·clamp(ρ_i, 0, α),
ρ_i = (its changed entries that others changed too) / (its changed entries no other changed),
counted over the whole tensor. Two passes over row blocks: the counts (integers: exact), then the
merge with mergekit's own operations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, TensorTask, check_finite, check_range, map_row_blocks
from .ram import masks, memory, merged_block, stacked


@dataclass(frozen=True)
class RamPlusParams:
    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        check_finite("r", self.r)
        check_range("alpha", self.alpha, 0.0, float("inf"))
        check_range("epsilon", self.epsilon, 0.0, float("inf"))


def merge(task: TensorTask, params: RamPlusParams) -> torch.Tensor:
    n = len(task.weights)
    shared = torch.zeros(n, dtype=torch.int64)
    unique_counts = torch.zeros(n, dtype=torch.int64)
    for rows in task.row_blocks():  # pass 1: per expert, changed entries shared and unique
        nonzero, _, overlap, unique = masks(stacked(task, rows), params.epsilon)
        shared += (nonzero & overlap).sum(dim=1).cpu()
        unique_counts += (nonzero & unique).sum(dim=1).cpu()
    rho = shared / unique_counts.clamp(min=params.epsilon)
    lambda_ = (1 + params.r * rho.clamp(min=0, max=params.alpha)).unsqueeze(-1)
    return map_row_blocks(task, lambda rows: merged_block(task, rows, params.epsilon, lambda_))


METHOD = Method(
    "ramplus_tl",
    RamPlusParams,
    merge,
    memory=memory,
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
)
