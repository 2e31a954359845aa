"""Σ|x| of float32 entries, exact and then rounded once to float64: the L1 norms DARE's rescaling
divides (methods/gta.py), the same on any thread count, CPU or device, with or without numba.

torch's `x.abs().sum(dtype=torch.float64)`, which these norms were before, sums in an order that
depends on the thread count and the CPU's vector width; for the sums of float32 magnitudes that
task vectors give it is exact in practice (every tensor and expert of the 0.5 B preset, 594: torch's
float64 sum on 1 and on 2 threads equals the exact one, `python bench/exact_norms.py`), so the
rounded exact sum gives the same bytes where torch's did.

How: a float32 magnitude is m·2^(e−150) with m its 24-bit integer mantissa (the implicit bit
included for e ≥ 1; a subnormal's e counts as 1). The accumulator holds integer sums under their
exponent: float32 mantissas by e (the last two bins non-zero where an entry was ∞, NaN), and
float64 mantissas of chunk sums known to be exact (math/fused_kernels.py `_exact_abs_sum`). The
total is one Python integer in units of 2⁻¹⁰⁷⁵, divided with one rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused

FLOAT32_BINS, FLOAT64_BINS = 257, 2048
EXACT_BINS = FLOAT32_BINS + FLOAT64_BINS
INF, NAN = 255, 256

# torch's fallback sums mantissas in float64, exact while each bin's sum stays below 2⁵³:
# below 2²⁴ each, so 2²⁹ entries at a time
_TORCH_CHUNK = 1 << 29


def new_accumulator() -> np.ndarray:
    return np.zeros(EXACT_BINS, dtype=np.int64)


def accumulate(values: torch.Tensor, acc: np.ndarray) -> None:
    """acc += the accumulator of float32 `values` (any device, any layout)."""
    if fused.available(values):
        fused.exact_abs_sum(values, acc)
        return
    flat = values.detach().reshape(-1)
    for start in range(0, flat.numel(), _TORCH_CHUNK):
        bits = flat[start : start + _TORCH_CHUNK].view(torch.int32) & 0x7FFFFFFF
        exponent = bits >> 23
        mantissa = bits & 0x7FFFFF
        finite = exponent < 255
        mantissa = torch.where(exponent > 0, mantissa | 0x800000, mantissa)
        sums = torch.bincount(exponent[finite], weights=mantissa[finite].double(), minlength=255)
        acc[:255] += sums.cpu().numpy().astype(np.int64)
        nan = int((~finite & (mantissa != 0x800000)).sum())  # exponent 255: ∞ has mantissa 0
        acc[NAN] += nan
        acc[INF] += int((~finite).sum()) - nan


def value(acc: np.ndarray) -> float:
    """The accumulated Σ|x|, rounded once to float64 (NaN if any entry was NaN, else ∞ if any was)."""
    if acc[NAN]:
        return math.nan
    if acc[INF]:
        return math.inf
    units = 0  # of 2⁻¹⁰⁷⁵: a float32 bin e holds multiples of 2^(max(e, 1) − 150), a float64 bin E of 2^(E − 1075)
    for e in np.flatnonzero(acc[:INF]):
        units += int(acc[e]) << (max(int(e), 1) - 150 + 1075)
    for e in np.flatnonzero(acc[FLOAT32_BINS:]):
        units += int(acc[FLOAT32_BINS + e]) << int(e)
    return units / (1 << 1075)  # int / int: correctly rounded


def abs_sum(values: torch.Tensor) -> float:
    """Σ|values| of a float32 tensor, exact, rounded once."""
    acc = new_accumulator()
    accumulate(values, acc)
    return value(acc)


class L1Norm:
    """‖·‖₁ accumulated over blocks: float32 entries exactly (rounded once, in `value`), others
    (a float64 compute dtype) as torch's float64 sums."""

    def __init__(self) -> None:
        self.acc = new_accumulator()
        self.other = 0.0

    def add(self, values: torch.Tensor) -> None:
        if values.dtype == torch.float32:
            accumulate(values, self.acc)
        else:
            self.other += float(values.abs().sum(dtype=torch.float64))

    def value(self) -> float:
        return value(self.acc) + self.other
