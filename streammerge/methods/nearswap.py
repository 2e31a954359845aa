"""nearswap: take the expert's value where it is within t of the base's, blend toward it
elsewhere (mergekit 0.1.5's `nearswap`): w = clamp(t / max(|W_0 − W_1|, 1e-6), 0, 1),
W = w·W_1 + (1 − w)·W_0. Elementwise, in row blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, check_finite, elementwise_memory_blocks, map_row_blocks


@dataclass(frozen=True)
class NearswapParams:
    t: float

    def __post_init__(self) -> None:
        check_finite("t", self.t)


def merge(task: TensorTask, params: NearswapParams) -> torch.Tensor:
    if len(task.weights) != 1:
        raise ValueError(f"nearswap takes exactly one expert, got {len(task.weights)}")

    def block(rows: Rows | None) -> torch.Tensor:
        a, b = task.base_rows(rows), task.expert_rows(0, rows)
        w = (params.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return w * b + (1 - w) * a

    return map_row_blocks(task, block)


METHOD = Method(
    "nearswap",
    NearswapParams,
    merge,
    memory=elementwise_memory_blocks(6.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
    max_experts=1,
)
