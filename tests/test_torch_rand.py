"""math/torch_rand.py: numba's draws are torch's CPU `rand` for the same seed, across calls and
shapes, and its masks are `tau.mul_(torch.rand(...) < density)` (and `>= p`) bit for bit."""

from __future__ import annotations

import pytest
import torch

from streammerge.math import fused, torch_rand

pytestmark = pytest.mark.skipif(not fused.installed(), reason="numba is not installed (the `fast` extra)")

SEEDS = (0, 1, 5489, 2**32 + 7, 2**63 - 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_draws_are_torchs(seed):
    g = torch.Generator().manual_seed(seed)
    ours = torch_rand.stream(torch.Generator().manual_seed(seed), fused.MIN_ELEMENTS)
    assert ours is not None
    for shape in ((1,), (623,), (2, 313), (5000,), (3, 7, 11)):
        assert torch.equal(ours.rand(shape), torch.rand(shape, generator=g))


@pytest.mark.parametrize("density", [0.0, 1e-9, 0.1, 0.3, 0.5, 0.9999999, 1.0])
@pytest.mark.parametrize("below", [True, False])
def test_masks_are_torchs(density, below):
    g = torch.Generator().manual_seed(11)
    tau = torch.randn(100_000, generator=g)
    tau[:50] = -0.0
    tau[50] = float("nan")
    ours = torch_rand.TorchRand(42)
    theirs = torch.Generator().manual_seed(42)
    for lo, hi in ((0, 70_001), (70_001, tau.numel())):  # two calls, the state running on
        got = ours.keep(tau[lo:hi].clone(), density, below)
        draws = torch.rand(hi - lo, generator=theirs)
        want = tau[lo:hi].clone().mul_(draws < density if below else draws >= density)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_small_float64_and_strided_tensors_draw_the_same_numbers():
    ours, theirs = torch_rand.TorchRand(3), torch.Generator().manual_seed(3)
    for t in (torch.randn(100, dtype=torch.float64), torch.randn(300, 400).t(), torch.randn(70_000)):
        got = ours.keep(t.clone(), 0.4)
        want = t.clone().mul_(torch.rand(t.shape, generator=theirs) < 0.4)
        assert torch.equal(got, want)


def test_threshold_is_torchs_float32_comparison():
    """`rand < d` compares in float32: the 24-bit draws below ceil(float32(d)·2²⁴) pass, exactly."""
    for d in (0.1, 0.3, 1 / 3, 0.7, 1e-7, 0.99999999, 0.5 + 2**-30):
        t = torch_rand.threshold(d)
        k = torch.arange(max(0, t - 3), min(1 << 24, t + 3))
        assert torch.equal(k.float() * 2.0**-24 < d, k < t)


def test_small_tensors_draw_with_torchs_generator_so_numba_is_not_loaded_for_them():
    """numba's runtime is planned only for tensors the kernels take (fused.MIN_ELEMENTS and up)."""
    assert torch_rand.stream(torch.Generator().manual_seed(1), fused.MIN_ELEMENTS - 1) is None
    assert isinstance(torch_rand.stream(torch.Generator().manual_seed(1), fused.MIN_ELEMENTS), torch_rand.TorchRand)


def test_without_numba_the_generator_is_torchs(monkeypatch):
    monkeypatch.setattr(fused, "installed", lambda: False)
    assert torch_rand.stream(torch.Generator().manual_seed(1), fused.MIN_ELEMENTS) is None


def test_where_torch_draws_otherwise_its_generator_is_kept_and_planned(monkeypatch):
    """A torch whose `rand` differed from ours: its own generator draws, and the plan is the
    float32 code's (gta.stored_memory gives none)."""
    from streammerge.methods import gta

    monkeypatch.setattr(torch_rand, "_checked", None)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(a[0] if a else k["size"]))
    assert torch_rand.stream(torch.Generator().manual_seed(1), fused.MIN_ELEMENTS) is None
    params = gta.GtaParams(sparsify="random", rescale=True)
    assert gta.stored_memory("w", (4096, 4096), 3, params) is None
    monkeypatch.setattr(torch_rand, "_checked", True)
    assert gta.stored_memory("w", (4096, 4096), 3, params) is not None
