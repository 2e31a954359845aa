"""task_arithmetic: W_0 + λ Σ w_i τ_i (Ilharco et al., 2022), one pass, a running sum per row block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, check_finite, elementwise_memory_blocks, map_row_blocks, weighted_sum


@dataclass(frozen=True)
class TaskArithmeticParams:
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        check_finite("lambda", self.lambda_)  # negative: task negation, as mergekit allows


def merged_task_vector(task: TensorTask, rows: Rows | None = None) -> torch.Tensor:
    """Σ w_i τ_i over rows `rows` (all rows: None)."""
    return weighted_sum(task, rows, task.task_vector)


def merge(task: TensorTask, params: TaskArithmeticParams) -> torch.Tensor:
    def block(rows: Rows | None) -> torch.Tensor:
        total = merged_task_vector(task, rows)
        return task.base_rows(rows) + total.mul_(params.lambda_)

    return map_row_blocks(task, block)


METHOD = Method(
    "task_arithmetic",
    TaskArithmeticParams,
    merge,
    memory=elementwise_memory_blocks(3.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    reads_once=lambda params, experts: True,  # per block: each expert's rows, the base's rows once
)
