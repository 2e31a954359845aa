"""slerp: spherical interpolation between the base and one expert (mergekit 0.1.5's `slerp`).

With a = W_0, b = W_1 flattened, θ = arccos(⟨a/‖a‖, b/‖b‖⟩):
    W = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b,   or (1−t)a + t·b where |cos θ| > 0.9995.
Norms below 1e-8 count as 1. `t` (0: the base, 1: the expert) may be a gradient over layers.

Streaming: the norms and the dot product accumulate over row blocks (float64), then the result
is written block by block, so the working set is a few blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Method, Rows, TensorTask, check_finite, elementwise_memory_blocks, map_row_blocks

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams:
    t: float  # required, as in mergekit

    def __post_init__(self) -> None:
        check_finite("t", self.t)


def coefficients(t: float, dot: float) -> tuple[float, float]:
    """Weights of a and b for interpolation fraction t at normalised dot product `dot`."""
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def sums(task: TensorTask) -> tuple[float, float, float]:
    """(⟨a, a⟩, ⟨b, b⟩, ⟨a, b⟩), each the sum over the row blocks of torch's float64 sum of the block.
    a, b and their product in float64 live in one scratch buffer made for the first (largest)
    block and reused: a fresh 32 MB block is mapped anew by glibc and faulted in every time
    (allocator.py); the same products and sums as on fresh tensors, so the same bytes. The buffer
    goes when this returns, before the blend pass."""
    aa = bb = ab = 0.0
    scratch = None
    for rows in task.row_blocks():
        a, b = task.base_rows(rows), task.expert_rows(0, rows)
        if scratch is None:
            scratch = torch.empty((3, a.numel()), dtype=torch.float64, device=a.device)
        a64, b64, product = (scratch[i, : a.numel()].view(a.shape) for i in range(3))
        a64.copy_(a)
        b64.copy_(b)
        del b
        aa += float(torch.mul(a64, a64, out=product).sum())
        bb += float(torch.mul(b64, b64, out=product).sum())
        ab += float(torch.mul(a64, b64, out=product).sum())
    return aa, bb, ab


def merge(task: TensorTask, params: SlerpParams) -> torch.Tensor:
    if len(task.weights) != 1:
        raise ValueError(f"slerp merges the base with exactly one expert, got {len(task.weights)}")
    aa, bb, ab = sums(task)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    ca, cb = coefficients(params.t, ab / (na * nb))

    def block(rows: Rows | None) -> torch.Tensor:
        return task.expert_rows(0, rows).mul_(cb).add_(task.base_rows(rows), alpha=ca)

    return map_row_blocks(task, block)


METHOD = Method(
    "slerp",
    SlerpParams,
    merge,
    # the norm pass: the base's block and the expert's (float32) beside the scratch's three float64
    # blocks (sums); the blend pass holds less
    memory=elementwise_memory_blocks(8.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
    max_experts=1,
)
