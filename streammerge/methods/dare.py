"""dare: drop each task-vector entry with probability p, rescale survivors by 1/(1−p)
(Yu et al., 2024), then combine by task arithmetic (`dare_linear`) or by TIES sign election
and disjoint merge without magnitude trimming (`dare_ties`, as mergekit and the DARE paper).

The drop mask is drawn on the CPU from a generator seeded by (seed, tensor name, expert), so
a merge is reproducible on any device and a resumed merge is byte-identical. Unlike mergekit,
survivors are rescaled by 1/(1−p) as in the paper, not to match the L1 norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ALIASES, Method, TensorTask, check_range, elementwise_memory, register
from .ties import disjoint_merge


@dataclass(frozen=True)
class DareParams:
    drop_rate: float = 0.5
    rescale: bool = True
    lambda_: float = 1.0
    combine: str = "task_arithmetic"  # or "ties"
    merge: str = "mean"  # disjoint mean or sum when combine = "ties"

    def __post_init__(self) -> None:
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        check_range("lambda", self.lambda_, 0.0, float("inf"))
        if self.combine not in ("task_arithmetic", "ties"):
            raise ValueError(f"combine = {self.combine!r} must be 'task_arithmetic' or 'ties'")
        if self.merge not in ("mean", "sum"):
            raise ValueError(f"merge = {self.merge!r} must be 'mean' or 'sum'")


def drop_and_rescale(tau: torch.Tensor, p: float, rescale: bool, rng: torch.Generator) -> torch.Tensor:
    keep = torch.rand(tau.shape, generator=rng, dtype=torch.float32) >= p
    tau.mul_(keep.to(tau.device))
    if rescale and p > 0:
        tau.div_(1.0 - p)
    return tau


def merge(task: TensorTask, params: DareParams) -> torch.Tensor:
    def dropped(i: int) -> torch.Tensor:
        p = params.drop_rate
        if task.densities and task.densities[i] is not None:
            p = 1.0 - float(task.densities[i])  # mergekit's per-model density is the keep rate
        return drop_and_rescale(task.task_vector(i), p, params.rescale, task.rng(i)).mul_(task.weights[i])

    if params.combine == "ties":
        merged = disjoint_merge(task, dropped, params.merge)
    else:
        merged = torch.zeros_like(task.base)
        for i in range(len(task.weights)):
            merged.add_(dropped(i))
    return task.base + params.lambda_ * merged


register(Method("dare", DareParams, merge, memory=lambda name, shape, n, p, item: elementwise_memory(9.8 if p.combine == "ties" else 4.25)(name, shape, n, p, item), doc=__doc__ or ""))
ALIASES["dare_linear"] = ("dare", {"combine": "task_arithmetic"})
ALIASES["dare_ties"] = ("dare", {"combine": "ties"})
