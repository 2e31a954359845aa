"""Statistics passes: a method's reads over (part of) the model before merging.

A method that needs statistics over each expert's whole model (TIES at model scope) or that
makes its memory plan tight from the data (OrthoMerge-C's conflicting rows) declares
`Method.statistics`: a reduction over `map_pass(fn, *args)`, where `fn` consumes the (name,
base rows, experts' rows) of every row block of the tensors of one part of the model. Locally
the model is one part; on Ray each output shard is one (ray.py). The result is journalled, so a
resumed merge does not recompute it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from .inputs import MergeInputs, OutputTensor
from .tensors import LazyExperts, TensorComputer


class ExpertRows:
    """The experts of one row block, indexed like LazyExperts."""

    def __init__(self, experts: LazyExperts, rows: tuple[int, int] | None):
        self.experts, self.r = experts, rows

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.experts[i] if self.r is None else self.experts.rows(i, *self.r)

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.experts.factors(i)


def pass_tensors(computer: TensorComputer, tensors: Sequence[OutputTensor]) -> list[OutputTensor]:
    """The merged tensors among `tensors` that the method's statistics read."""
    wanted = computer.method.statistics_tensors
    values = computer.job.values
    return [t for t in tensors if t.merged and (wanted is None or wanted(t.name, t.shape, values[t.name].params))]


def model_blocks(computer: TensorComputer, tensors: Sequence[OutputTensor], progress: bool = True) -> Iterator:
    """(name, base rows, experts' rows) for every row block of the tensors a pass reads."""
    for t in tqdm(pass_tensors(computer, tensors), desc="statistics", unit="tensor", disable=not progress, leave=False):
        task = computer.task(t)
        for rows in task.row_blocks():
            yield t.name, task.base_rows(rows), ExpertRows(task.experts, rows)  # type: ignore[arg-type]


def local_map_pass(computer: TensorComputer, tensors: Sequence[OutputTensor], progress: bool) -> Callable[..., list]:
    """The map pass of one process: the whole model in one part."""

    def map_pass(fn, *args) -> list:
        return [fn(model_blocks(computer, tensors, progress), *args)]

    return map_pass


def merge_statistics(inputs: MergeInputs, map_pass: Callable[..., list]):
    """The statistics a method's merge reads (TIES at model scope: thresholds per expert)."""
    method = inputs.method
    return method.statistics(map_pass, len(inputs.experts), inputs.params, inputs.model_values())


def plan_statistics(inputs: MergeInputs, computer: TensorComputer, progress: bool):
    """What a plan_statistics method measures to make its plan tight (read here, never on Ray)."""
    map_pass = local_map_pass(computer, inputs.merged_tensors(), progress)
    return inputs.method.statistics(map_pass, len(inputs.experts), inputs.params, None)
