"""task_arithmetic: W_0 + λ Σ w_i τ_i (Ilharco et al., 2022), one pass, a running sum."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, TensorTask, check_range, elementwise_memory, register


@dataclass(frozen=True)
class TaskArithmeticParams:
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        check_range("lambda", self.lambda_, 0.0, float("inf"))


def merged_task_vector(task: TensorTask) -> torch.Tensor:
    total = torch.zeros_like(task.base)
    for i, w in enumerate(task.weights):
        total.add_(task.task_vector(i), alpha=w)
    return total


def merge(task: TensorTask, params: TaskArithmeticParams) -> torch.Tensor:
    return task.base + params.lambda_ * merged_task_vector(task)


register(Method("task_arithmetic", TaskArithmeticParams, merge, memory=elementwise_memory(3.0), doc=__doc__ or ""))
