"""arcee_fusion: keep the expert's change only where it matters most (mergekit 0.1.5's
`arcee_fusion`, one expert). Importance s = |W_1 − W_0| · KL(softmax(W_1) ‖ softmax(W_0)), the
KL taken per row (last dimension); the threshold is median(s) + 1.5·IQR(s) from the sorted
scores (quantile q at index ⌊q(n−1)⌋); W = W_0 + (W_1 − W_0)·[s ≥ threshold].

Tensors over 10⁶ entries estimate the quantiles from 10⁶ entries drawn with replacement, from our
generator seeded by (seed, tensor) — mergekit draws from torch's unseeded global generator, so
there the two tools agree in distribution, not entry by entry. Whole tensors in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, TensorTask, whole_tensor_memory

SAMPLE = 1_000_000


@dataclass(frozen=True)
class ArceeFusionParams:
    pass


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    diff = (expert - base).abs()
    p = F.softmax(expert, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def merge(task: TensorTask, params: ArceeFusionParams) -> torch.Tensor:
    if len(task.weights) != 1:
        raise ValueError(f"arcee_fusion takes exactly one expert, got {len(task.weights)}")
    base, expert = task.base, task.experts[0]
    scores = importance(expert, base)
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=task.rng(0)).to(flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
    keep = (scores >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (expert - base) * keep


METHOD = Method(
    "arcee_fusion",
    ArceeFusionParams,
    merge,
    memory=whole_tensor_memory(7.0),
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
    max_experts=1,
)
