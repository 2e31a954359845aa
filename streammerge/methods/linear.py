"""linear: the weighted average of the experts, Σ w_i W_i / Σ w_i (model soup)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, TensorTask, elementwise_memory, register


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True  # divide by Σ w_i (mergekit's default); False gives Σ w_i W_i


def merge(task: TensorTask, params: LinearParams) -> torch.Tensor:
    total = torch.zeros_like(task.base)
    for i, w in enumerate(task.weights):
        total.add_(task.experts[i], alpha=w)
    if params.normalize:
        s = sum(task.weights)
        if s == 0:
            raise ValueError("linear: the expert weights sum to zero")
        total.div_(s)
    return total


register(Method("linear", LinearParams, merge, memory=elementwise_memory(3.0), doc=__doc__ or ""))
