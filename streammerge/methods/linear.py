"""linear: the weighted average of the experts, Σ w_i W_i / Σ w_i (model soup), per row block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, elementwise_memory_blocks, map_row_blocks, weighted_sum


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True  # divide by Σ w_i (mergekit's default); False gives Σ w_i W_i


def check_experts(params: LinearParams, experts: tuple[dict, ...]) -> None:
    if params.normalize and experts and sum(float(e.get("weight", 1.0)) for e in experts) == 0:
        raise ValueError("the expert weights sum to zero, so they cannot be normalised")


def merge(task: TensorTask, params: LinearParams) -> torch.Tensor:
    s = sum(task.weights)
    if params.normalize and s == 0:
        raise ValueError("linear: the expert weights sum to zero")

    def block(rows: Rows | None) -> torch.Tensor:
        total = weighted_sum(task, rows, task.expert_rows)
        return total.div_(s) if params.normalize else total

    return map_row_blocks(task, block)


METHOD = Method(
    "linear",
    LinearParams,
    merge,
    memory=elementwise_memory_blocks(3.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    check_experts=check_experts,
    reads_once=lambda params, experts: True,  # per block: each expert's rows
)
