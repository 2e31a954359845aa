"""math/exact_sum.py: Σ|x| of float32 entries is the exact sum rounded once (math.fsum's value),
with numba's kernel and with torch's fallback, in one call or accumulated over many blocks, for
magnitudes from subnormal to the largest, and NaN or ∞ as torch's sum gives them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streammerge.math import exact_sum, fused


def fsum(t: torch.Tensor) -> float:
    return math.fsum(t.abs().double().reshape(-1).tolist())


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if not fused.installed():
            pytest.skip("numba is not installed (the `fast` extra)")
    else:
        monkeypatch.setattr(fused, "available", lambda *t, **k: False)
    return request.param


def wide_range(n: int, seed: int) -> torch.Tensor:
    """Magnitudes over the whole float32 range, subnormals and ±0 among them."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-149, 120, (n,), generator=g).double()
    x = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5) * torch.pow(2.0, exponents)
    x = x.float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = -0.0
    return x


@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, fused.MIN_ELEMENTS + 777])
def test_the_sum_is_exact_then_rounded_once(path, n):
    for t in (wide_range(n, n), (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3)):
        assert exact_sum.abs_sum(t) == fsum(t)


def test_task_vector_sums_are_torchs(path):
    """Sums of bf16-step differences, the norms DARE rescales by: torch's float64 sum gives the
    same value (it is exact for them), so the bytes of a merge do not change."""
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(300_000, generator=g) * 0.02).to(torch.bfloat16)
    tau = (base.float() + torch.randn(300_000, generator=g) * 0.002).to(torch.bfloat16).float() - base.float()
    assert exact_sum.abs_sum(tau) == float(tau.abs().sum(dtype=torch.float64)) == fsum(tau)


def test_blocks_accumulate_to_the_exact_sum(path):
    """Many blocks into one accumulator: bins that would pass 2⁶³ carry, and blocks whose float64
    sum would round (tiny and huge magnitudes together) are summed entry by entry."""
    big = torch.full((1 << 16,), 3.0e4)
    acc = exact_sum.new_accumulator()
    for _ in range(3000):
        exact_sum.accumulate(big, acc)
    assert exact_sum.value(acc) == 3000 * (1 << 16) * 3.0e4
    mixed = torch.tensor([1.0e30, 1.0e-30, 3.0, 1e-45] * (1 << 15))
    acc = exact_sum.new_accumulator()
    for _ in range(5):
        exact_sum.accumulate(mixed, acc)
    assert exact_sum.value(acc) == math.fsum(mixed.double().tolist() * 5)


def test_nonfinite_entries_sum_as_torchs(path):
    n = fused.MIN_ELEMENTS + 5
    for bad, expected in (([float("inf")], math.inf), ([float("-inf"), float("nan")], None), ([float("nan")], None)):
        t = torch.ones(n)
        t[7 : 7 + len(bad)] = torch.tensor(bad)
        got = exact_sum.abs_sum(t)
        assert math.isnan(got) if expected is None else got == expected
        torchs = float(t.abs().sum(dtype=torch.float64))
        assert (math.isnan(got) and math.isnan(torchs)) or got == torchs


def test_l1norm_keeps_torchs_sum_for_float64():
    t = torch.randn(1000, dtype=torch.float64)
    norm = exact_sum.L1Norm()
    norm.add(t)
    norm.add(t)
    assert norm.value() == 2 * float(t.abs().sum(dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 3000), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_any_finite_float32_entries(values):
    t = torch.from_numpy(values.copy())
    assert exact_sum.abs_sum(t) == fsum(t)
    if fused.installed():
        big = t.repeat(fused.MIN_ELEMENTS // t.numel() + 1)
        assert exact_sum.abs_sum(big) == fsum(big)


def test_the_kernels_accumulator_has_this_modules_layout():
    if not fused.installed():
        pytest.skip("numba is not installed (the `fast` extra)")
    from streammerge.math import fused_kernels

    assert (fused_kernels.FLOAT32_BINS, fused_kernels.FLOAT64_BINS) == (exact_sum.FLOAT32_BINS, exact_sum.FLOAT64_BINS)
