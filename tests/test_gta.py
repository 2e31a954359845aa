"""gta's sparsifiers against direct sort-based references (mergekit's formulas), whole and
streamed in row blocks; L1 rescaling; DELLA's epsilon check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods import gta


def rescaled(t: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = t * mask
    if not rescale:
        return masked
    before, after = t.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def reference(kind: str, t: torch.Tensor, density: float, gamma: float, rescale: bool, stable: bool) -> torch.Tensor:
    """mergekit/sparsify.py's magnitude and magnitude_outliers; `stable`: ties earliest first."""
    n = t.numel()
    w = t.abs().reshape(-1).float()
    mask = torch.zeros(n)
    if kind == "magnitude":
        k = max(1, int(density * n))
        mask[(torch.argsort(w, descending=True, stable=True) if stable else torch.argsort(w, descending=True))[:k]] = 1
    else:
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        mask[
            (torch.sort(w, stable=True) if stable else torch.sort(w, descending=False)).indices[
                bottom : bottom + target
            ]
        ] = 1
    return rescaled(t, mask.view(t.shape), rescale)


def streamed(sp: gta.Sparsifier, t: torch.Tensor, rows: int) -> torch.Tensor:
    blocks = [(s, min(s + rows, t.shape[0])) for s in range(0, t.shape[0], rows)]
    for stage in range(sp.passes):
        sp.begin(stage)
        for r in blocks:
            sp.observe(stage, t[r[0] : r[1]].clone())
    sp.ready()
    return torch.cat([sp.apply(t[r[0] : r[1]].clone()) for r in blocks])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 30),
    cols=st.integers(1, 30),
    density=st.floats(0.05, 0.95),
    gamma=st.floats(0.0, 0.2),
    kind=st.sampled_from(["magnitude", "magnitude_outliers"]),
    rescale=st.booleans(),
    block=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_magnitude_sparsifiers_equal_a_sort(rows, cols, density, gamma, kind, rescale, block, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.round(torch.randn(rows, cols, generator=g) * 3) / 4  # many ties, some zeros
    values = {"density": density, "gamma": gamma}
    whole = gta.whole(gta.Sparsifier(kind, values, rescale, (rows, cols), lambda: None), t.clone())
    torch.testing.assert_close(whole, reference(kind, t, density, gamma, rescale, stable=False), rtol=1e-6, atol=0)
    blocked = streamed(gta.Sparsifier(kind, values, rescale, (rows, cols), lambda: None), t, block)
    torch.testing.assert_close(blocked, reference(kind, t, density, gamma, rescale, stable=True), rtol=1e-6, atol=0)
    # tie_break "index" (the default): a whole tensor keeps the earliest ties too
    earliest = gta.whole(gta.Sparsifier(kind, values, rescale, (rows, cols), lambda: None), t.clone(), False)
    torch.testing.assert_close(earliest, reference(kind, t, density, gamma, rescale, stable=True), rtol=1e-6, atol=0)
    assert gta.GtaParams().tie_break == "index"


@pytest.mark.parametrize("kind", ["random", "della_magprune"])
def test_random_sparsifiers_restore_the_l1_norm_and_stream_identically(kind):
    t = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    values = {"density": 0.3, "epsilon": 0.1}

    def make():
        return gta.Sparsifier(kind, values, True, tuple(t.shape), lambda: torch.Generator().manual_seed(7))

    whole = gta.whole(make(), t.clone())
    assert 0.2 < float((whole != 0).float().mean()) < 0.4
    assert float(whole.abs().sum()) == pytest.approx(float(t.abs().sum()), rel=1e-5)
    assert torch.equal(streamed(make(), t, 9), whole)


def test_della_magprune_keeps_large_entries_more_often():
    t = torch.arange(1, 1001, dtype=torch.float32).repeat(200, 1)  # every row ranks the same
    kept = (
        gta.whole(
            gta.Sparsifier(
                "della_magprune",
                {"density": 0.5, "epsilon": 0.4},
                False,
                tuple(t.shape),
                lambda: torch.Generator().manual_seed(0),
            ),
            t.clone(),
        )
        != 0
    )
    rate = kept.float().mean(0)
    assert float(rate[:100].mean()) == pytest.approx(0.14, abs=0.03)  # p = 0.1 + 0.8·rank/999
    assert float(rate[-100:].mean()) == pytest.approx(0.86, abs=0.03)
    with pytest.raises(ValueError, match="density ± epsilon"):
        gta.Sparsifier("della_magprune", {"density": 0.9, "epsilon": 0.15}, False, (3,), lambda: None)


def test_density_one_keeps_the_task_vector_unscaled():
    t = torch.randn(10, 10)
    for kind in ("magnitude", "random", "magnitude_outliers", "della_magprune"):
        assert torch.equal(
            gta.whole(gta.Sparsifier(kind, {"density": 1.0}, True, (10, 10), lambda: torch.Generator()), t.clone()), t
        )
