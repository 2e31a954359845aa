"""linear: the weighted average of the experts, Σ w_i W_i / Σ w_i (model soup), per row block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, Rows, TensorTask, elementwise_memory_blocks, map_row_blocks, register


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True  # divide by Σ w_i (mergekit's default); False gives Σ w_i W_i


def merge(task: TensorTask, params: LinearParams) -> torch.Tensor:
    s = sum(task.weights)
    if params.normalize and s == 0:
        raise ValueError("linear: the expert weights sum to zero")

    def block(rows: Rows | None) -> torch.Tensor:
        total = None
        for i, w in enumerate(task.weights):
            w_i = task.expert_rows(i, rows)
            if total is None:
                total = torch.zeros_like(w_i)
            total.add_(w_i, alpha=w)
            del w_i
        assert total is not None, "no experts"
        return total.div_(s) if params.normalize else total

    return map_row_blocks(task, block)


register(
    Method(
        "linear",
        LinearParams,
        merge,
        memory=elementwise_memory_blocks(3.0),
        doc=__doc__ or "",
        propagates_nonfinite=True,
    )
)
