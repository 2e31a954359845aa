"""Skew-symmetric matrices in PEFT's packed form.

PEFT (≥ 0.16) stores an OFT block generator as the strict upper triangle of `Q`, in
`torch.triu_indices(b, b, 1)` order (row-major), and rebuilds `Q = U − Uᵀ`. A layer with r
blocks stores `[r, b(b−1)/2]`; the block-diagonal generator acts on contiguous input blocks.
"""

from __future__ import annotations

import math

import torch


def block_size_from_packed(packed_len: int) -> int:
    """b from b(b−1)/2; raises ValueError when `packed_len` is not a triangular number."""
    b = int(round((1 + math.sqrt(1 + 8 * packed_len)) / 2))
    if b * (b - 1) // 2 != packed_len or b < 2:
        raise ValueError(f"{packed_len} is not b(b-1)/2 for any block size b ≥ 2")
    return b


def unpack_skew(packed: torch.Tensor) -> torch.Tensor:
    """[..., b(b−1)/2] → [..., b, b] with Q = U − Uᵀ."""
    b = block_size_from_packed(packed.shape[-1])
    rows, cols = torch.triu_indices(b, b, 1, device=packed.device)
    q = packed.new_zeros(*packed.shape[:-1], b, b)
    q[..., rows, cols] = packed
    return q - q.transpose(-1, -2)


def pack_skew(q: torch.Tensor) -> torch.Tensor:
    """[..., b, b] skew → [..., b(b−1)/2] (its strict upper triangle)."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[..., rows, cols]


def skew_part(a: torch.Tensor) -> torch.Tensor:
    """½(A − Aᵀ): the projection onto so(n), used to clean round-off and by old PEFT formats."""
    return 0.5 * (a - a.transpose(-1, -2))


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """[r, b, b] → [r·b, r·b] block-diagonal."""
    return torch.block_diag(*blocks.unbind(0))
