"""sce: select, calculate, erase (Wan et al., 2024; mergekit 0.1.5's `sce`).

Select: with `select_topk` < 1, keep the k = ⌊select_topk · #nonzero⌋ entries of largest
variance across the experts' task vectors (population variance), in every task vector.
Calculate: expert weights ∝ mean(τ_i²) (equal if those sum to ~0). Erase: TIES's sign
election (sign of Σ τ_i, 0 → +), then W = W_0 + Σ a_i c_i τ_i / max(Σ a_i c_i, 1e-6) with a_i
the agreement mask. Ties at the top-k threshold follow torch.topk, as in mergekit.

Streaming: a tensor whose N task vectors fit `WHOLE_BYTES` is merged whole, as mergekit does. A
larger one (a 128k-vocabulary embedding) goes in row blocks, N at a time: with `select_topk` < 1
two histogram passes find the exact k-th largest variance (ties at it kept in row-major order,
not torch.topk's), one pass sums each expert's Σ τ_i² (float64), and the last merges each block
(sign election and erase are elementwise). The weights then equal the whole tensor's to float32
round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import math

from ..plan import Need
from .base import BLOCK_ELEMENTS, Method, Rows, TensorTask, holds_whole, map_row_blocks
from .ties import RadixSelect, _bits_of

WHOLE_BYTES = 1 << 28  # the N task vectors of one tensor are held whole up to this size


@dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0
    int8_mask: bool = False  # mergekit's mask storage; no effect on the result


def erase_and_merge(base: torch.Tensor, tvs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W_0 + Σ a_i c_i τ_i / max(Σ a_i c_i, 1e-6), a_i: τ_i agrees with the sign of Σ τ (0 → +)."""
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(tvs.dtype)
    erase = (tvs.sign() == majority).to(tvs.dtype)
    erase.mul_(weights.view(-1, *([1] * (tvs.dim() - 1))))
    merged = (tvs * erase).sum(dim=0) / erase.sum(dim=0).clamp(min=1e-6)
    return base + merged


def merge_whole(task: TensorTask, params: SceParams, n: int) -> torch.Tensor:
    base = task.base
    tvs = torch.stack([task.task_vector(i) for i in range(n)])
    if params.select_topk <= 0:
        tvs.zero_()
    elif params.select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * params.select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs.mul_(mask.unsqueeze(0))
        del var, mask
    weights = tvs.square().reshape(n, -1).mean(dim=1)
    return erase_and_merge(base, tvs, _normalised(weights, n))


def _normalised(weights: torch.Tensor, n: int) -> torch.Tensor:
    """c_i ∝ mean(τ_i²), equal where those sum to ~0."""
    total = float(weights.sum())
    return torch.ones_like(weights) / n if abs(total) < 1e-6 else weights / total


class VarianceMask:
    """The top-k variance entries of a streamed tensor: k = ⌊select_topk · #nonzero variances⌋,
    the exact k-th largest by radix select, ties at it kept in row-major order."""

    def __init__(self, topk: float):
        self.topk = topk
        self.select = RadixSelect(1)
        self.nonzero = 0
        self.bound: tuple[int, int] | None = None  # (threshold bits, ties to keep)
        self.ties_seen = 0

    def observe(self, stage: str, var: torch.Tensor) -> None:
        bits = var.abs().to(torch.float32).view(torch.int32).reshape(-1)
        if stage == "high":
            self.nonzero += int(torch.count_nonzero(var))
            self.select.add_high(bits)
        else:
            self.select.add_low(bits)

    def count(self) -> int:
        return int(self.nonzero * self.topk)

    def start(self) -> None:
        """Between the histogram passes: k is known once the nonzero count is."""
        self.select.k = max(1, self.count())

    def ready(self) -> None:
        value = self.select.value()
        self.bound = (_bits_of(value), self.count() - self.select.above)
        self.ties_seen = 0

    def mask(self, var: torch.Tensor) -> torch.Tensor:
        assert self.bound is not None
        bits = var.abs().to(torch.float32).view(torch.int32)
        keep = bits > self.bound[0]
        tied = (bits == self.bound[0]).reshape(-1).nonzero().squeeze(1)
        take = max(0, min(tied.numel(), self.bound[1] - self.ties_seen))
        keep.view(-1)[tied[:take]] = True
        self.ties_seen += tied.numel()
        return keep


def merge(task: TensorTask, params: SceParams) -> torch.Tensor:
    n = len(task.weights)
    if holds_whole(task, n, WHOLE_BYTES):
        return merge_whole(task, params, n)
    blocks = task.row_blocks()

    def vectors(rows: Rows | None) -> torch.Tensor:
        return torch.stack([task.task_vector(i, rows) for i in range(n)])

    selection: VarianceMask | None = None
    if 0 < params.select_topk < 1:
        selection = VarianceMask(params.select_topk)
        for stage in ("high", "low"):
            for rows in blocks:
                selection.observe(stage, torch.var(vectors(rows), dim=0, unbiased=False))
            if stage == "high":
                if selection.count() == 0:
                    break
                selection.start()
        if selection.count() == 0:
            params = SceParams(select_topk=0.0)
            selection = None
        else:
            selection.ready()

    def selected(rows: Rows | None) -> torch.Tensor:
        tvs = vectors(rows)
        if params.select_topk <= 0:
            return tvs.zero_()
        if selection is not None:
            tvs.mul_(selection.mask(torch.var(tvs, dim=0, unbiased=False)).to(tvs.dtype).unsqueeze(0))
        return tvs

    squares = torch.zeros(n, dtype=torch.float64)
    for rows in blocks:
        squares += selected(rows).to(torch.float64).square().reshape(n, -1).sum(dim=1).cpu()
    if selection is not None:
        selection.ties_seen = 0  # the merge pass draws the same mask
    weights = _normalised((squares / math.prod(task.shape)).to(task.dtype), n)
    return map_row_blocks(
        task,
        lambda rows: erase_and_merge(task.base_rows(rows), selected(rows), weights.to(task.base_rows(rows).device)),
    )


def memory(name: str, shape: tuple[int, ...], n: int, params: SceParams, itemsize: int):
    """Whole: about 4 + 3N copies of the tensor; streamed: N blocks and their float64 squares,
    the variance and mask, and the erase temporaries."""

    numel = math.prod(shape)
    if numel <= BLOCK_ELEMENTS or n * numel * itemsize <= WHOLE_BYTES:
        return Need(int((4 + 3 * n) * numel * itemsize))
    return Need(int((5 * n + 6) * BLOCK_ELEMENTS * itemsize), transfer=BLOCK_ELEMENTS)


METHOD = Method("sce", SceParams, merge, memory=memory, doc=__doc__ or "", propagates_nonfinite=True, expert_params={})
