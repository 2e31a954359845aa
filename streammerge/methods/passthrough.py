"""passthrough: the input tensor, times `scale` if given (mergekit 0.1.5's `passthrough`). With
layer slices (io/sliced.py) it stacks layer ranges of models (a "frankenmerge"); `scale` may be
set per source, per slice or for the recipe, with filters on the source tensor's name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, elementwise_memory_blocks, map_row_blocks


@dataclass(frozen=True)
class PassthroughParams:
    scale: float | None = None


def merge(task: TensorTask, params: PassthroughParams) -> torch.Tensor:
    if len(task.weights):
        raise ValueError("passthrough takes one model (or layer slices) and no experts")

    def block(rows: Rows | None) -> torch.Tensor:
        t = task.base_rows(rows)
        return t.clone() if params.scale is None else t * params.scale

    return map_row_blocks(task, block)


METHOD = Method(
    "passthrough",
    PassthroughParams,
    merge,
    memory=elementwise_memory_blocks(2.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
    min_experts=0,
    max_experts=0,
)
