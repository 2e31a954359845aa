"""Hypothesis strategies for the math modules (test-time only; imports hypothesis lazily)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def matrices(
    draw,
    rows: int | tuple[int, int] = (1, 10),
    cols: int | tuple[int, int] = (1, 10),
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
):
    """A Gaussian matrix from a drawn seed (cheap to shrink; reproducible)."""
    r = rows if isinstance(rows, int) else draw(st.integers(*rows))
    c = cols if isinstance(cols, int) else draw(st.integers(*cols))
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(r, c, generator=g, dtype=torch.float64).mul_(scale).to(dtype)


@st.composite
def skew_matrices(draw, n: int | tuple[int, int] = (1, 10), dtype: torch.dtype | None = None, max_norm: float = 3.0):
    size = n if isinstance(n, int) else draw(st.integers(*n))
    a = draw(matrices(size, size, torch.float64))
    q = a - a.T
    norm = float(torch.linalg.matrix_norm(q))
    target = draw(st.floats(0.0, max_norm))
    if norm > 0:
        q = q * (target / norm)
    return q.to(dtype or draw(st.sampled_from([torch.float32, torch.float64])))
