"""ram: Reinforced Agent Merging (arXiv 2601.13572; mergekit 0.1.5's `ram`). Per entry, the experts
whose |τ_i| > ε contribute: an entry only one expert changed keeps that change whole, an entry
several changed gets their mean: W = W₀ + Σ_i τ_i·[|τ_i| > ε]·(1 if c = 1 else 1/c), c the number
of contributing experts. No weights. Elementwise, in row blocks, with mergekit's own operations
(so the same bits in float32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, check_range, elementwise_memory_blocks, map_row_blocks


@dataclass(frozen=True)
class RamParams:
    epsilon: float = 1e-5  # |τ| at or below it does not count as a change

    def __post_init__(self) -> None:
        check_range("epsilon", self.epsilon, 0.0, float("inf"))


def masks(taus: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    """(nonzero [N, M], contributing counts [1, M], overlap, unique) of stacked task vectors."""
    nonzero = taus.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return nonzero, counts, counts > 1, counts == 1


def stacked(task: TensorTask, rows: Rows | None) -> torch.Tensor:
    """The N task vectors of a row block, flattened: [N, M]."""
    return torch.stack([task.task_vector(i, rows) for i in range(len(task.weights))]).view(len(task.weights), -1)


def merged_block(
    task: TensorTask, rows: Rows | None, epsilon: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """W₀ + the RAM merge of one row block; `scale` [N, 1]: RAM+'s factor on each expert's unique entries."""
    base = task.base_rows(rows)
    taus = stacked(task, rows)
    nonzero, counts, overlap, unique = masks(taus, epsilon)
    taus = taus * nonzero
    own = taus * unique if scale is None else taus * unique * scale.to(device=taus.device, dtype=torch.float32)
    merged = (own + (taus * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def merge(task: TensorTask, params: RamParams) -> torch.Tensor:
    return map_row_blocks(task, lambda rows: merged_block(task, rows, params.epsilon))


def memory(name: str, shape: tuple[int, ...], n: int, params, itemsize: int):
    """A row block of the N stacked task vectors, their masked copy and the products: ~3N + 6 blocks."""
    return elementwise_memory_blocks(3 * n + 6)(name, shape, n, params, itemsize)


METHOD = Method(
    "ram",
    RamParams,
    merge,
    memory=memory,
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
)
