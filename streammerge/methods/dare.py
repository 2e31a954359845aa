"""dare: drop each task-vector entry with probability p, rescale survivors by 1/(1−p)
(Yu et al., 2024), then combine by task arithmetic (`dare_linear`) or by TIES sign election
and disjoint merge without magnitude trimming (`dare_ties`, as mergekit and the DARE paper).

The drop mask is drawn on the CPU from a generator seeded by (seed, tensor name, expert), so
a merge is reproducible on any device and a resumed merge is byte-identical. Row blocks draw
from the same generator in row order, which gives exactly the draws of the whole tensor at
once (torch's CPU `rand` is sequential; numba makes the same draws where it can,
math/torch_rand.py), so the block size never changes the result. Unlike
mergekit, survivors are rescaled by 1/(1−p) as in the paper, not to match the L1 norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .base import (
    check_choice,
    Method,
    Rows,
    TensorTask,
    check_finite,
    check_range,
    elementwise_memory_blocks,
    map_row_blocks,
)
from .ties import disjoint_merge_blocks
from ..math import fused, torch_rand
from ..math.torch_rand import TorchRand


@dataclass(frozen=True)
class DareParams:
    drop_rate: float = 0.5
    rescale: bool = True
    lambda_: float = 1.0
    combine: str = "task_arithmetic"  # or "ties"
    merge: str = "mean"  # disjoint mean or sum when combine = "ties"

    def __post_init__(self) -> None:
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        check_finite("lambda", self.lambda_)  # negative: task negation, as mergekit allows
        check_choice("combine", self.combine, ("task_arithmetic", "ties"))
        check_choice("merge", self.merge, ("mean", "sum"))


def drop_and_rescale(tau: torch.Tensor, p: float, rescale: bool, rng: torch.Generator | TorchRand) -> torch.Tensor:
    if isinstance(rng, TorchRand):
        rng.keep(tau, p, below=False)
    else:
        keep = torch.rand(tau.shape, generator=rng, dtype=torch.float32) >= p
        tau.mul_(keep.to(tau.device))
    if rescale and p > 0:
        tau.div_(1.0 - p)
    return tau


def merge(task: TensorTask, params: DareParams) -> torch.Tensor:
    n = len(task.weights)
    # one per expert, running on across the row blocks; torch's draws, made in numba where it can
    numel = math.prod(task.shape)
    rngs = [torch_rand.stream(g, numel) or g for g in (task.rng(i) for i in range(n))]
    drop = []
    for i in range(n):
        p = params.drop_rate
        if task.densities and task.densities[i] is not None:
            p = 1.0 - float(task.densities[i])  # mergekit's per-model density is the keep rate
        drop.append(p)

    def dropped(i: int, rows: Rows | None) -> torch.Tensor:
        return drop_and_rescale(task.task_vector(i, rows), drop[i], params.rescale, rngs[i]).mul_(task.weights[i])

    if params.combine == "ties":
        return disjoint_merge_blocks(
            task, lambda rows: [dropped(i, rows) for i in range(n)], params.merge, params.lambda_
        )

    def block(rows: Rows | None) -> torch.Tensor:
        merged = None
        for i in range(n):
            v = dropped(i, rows)
            if merged is None:
                merged = torch.zeros_like(v)
            merged.add_(v)
            del v
        assert merged is not None, "no experts"
        return task.base_rows(rows) + params.lambda_ * merged

    return map_row_blocks(task, block)


def memory(name: str, shape: tuple[int, ...], n: int, params: DareParams, itemsize: int):
    """Per row block: TA keeps the base block, the sum, one vector, its random draws and mask and
    the result (4.5 blocks, fitted to measured peaks); TIES all N vectors and the
    sign election's temporaries."""
    buffers = n + 6.0 if params.combine == "ties" else 4.5
    need = elementwise_memory_blocks(buffers)(name, shape, n, params, itemsize)
    # at least numba's runtime where the kernels take the tensor (its draws, TIES's kernels): the
    # constants above, fitted on tensors of many blocks, hold it; a model of small tensors measured
    # 14 % above a plan without it (51 % under --report; tools/demo.sh dare_ties)
    return replace(need, work=max(need.work, fused.runtime_bytes(math.prod(shape), kernels(params, False))))


def kernels(params: DareParams, stored: bool) -> tuple[str, ...]:
    """The numba kernels the merge calls (fused.runtime_bytes): torch's draws (where numba makes them:
    torch_rand.available) and TIES's disjoint merge; it reads no input as stored."""
    draws = ("_mt_seed", "_mt_keep") if torch_rand.available() else ()
    return (*draws, *(("_disjoint",) if params.combine == "ties" else ()))


METHOD = Method(
    "dare",
    DareParams,
    merge,
    memory=memory,
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={"weight": 1.0, "density": None},  # density: the keep rate, 1 − drop_rate (mergekit's)
    kernels=kernels,
)
ALIASES = {"dare_linear": ("dare", {"combine": "task_arithmetic"}), "dare_ties": ("dare", {"combine": "ties"})}
