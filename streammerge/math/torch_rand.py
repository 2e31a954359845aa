"""torch's CPU `rand` in float32, drawn by numba where a method fuses the draws into its pass
(methods/gta.py's random masks, methods/dare.py): the same numbers, several times faster, and the
mask applied as they are drawn.

torch's CPU generator is MT19937 (Matsumoto and Nishimura, 1998), seeded by `manual_seed(s)` with
the reference init_genrand of s's low 32 bits; float32 `rand` takes the low 24 bits of each
output in order, times 2⁻²⁴. `x < d` for a Python float d compares in float32, so an entry is
kept by `rand < d` exactly when its 24 bits are below ceil(float32(d)·2²⁴). That is torch's
behaviour, not its contract, so `available` checks the installed torch against the reference
algorithm once per process (1,300 draws, split across calls) and `stream` returns None where it
differs: then the caller keeps torch's generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused

_checked: bool | None = None


def threshold(density: float) -> int:
    """The 24-bit draws below which `rand < density` holds."""
    return min(1 << 24, max(0, math.ceil(float(np.float32(density)) * (1 << 24))))


class TorchRand:
    """The draws of `torch.rand(..., generator=torch.Generator().manual_seed(seed))`, in order."""

    def __init__(self, seed: int):
        self.state = np.empty(624, dtype=np.uint32)
        fused.mt_seed(seed & 0xFFFFFFFF, self.state)
        self.pos = 624  # the first draw generates the next 624 words

    def rand(self, shape) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32)
        self.pos = fused.mt_uniform(self.state, self.pos, out)
        return out

    def keep(self, values: torch.Tensor, density: float, below: bool = True) -> torch.Tensor:
        """values ← values·(rand < density) in place (`below`; else rand ≥ density), one draw per
        entry in row-major order; returns values. Float32 CPU contiguous values (fused.available)
        in one pass; others by comparing `rand`'s draws, as torch's code does."""
        if fused.available(values):
            self.pos = fused.mt_keep(values, self.state, self.pos, threshold(density), below)
            return values
        draws = self.rand(values.shape).to(values.device)
        return values.mul_(draws < density if below else draws >= density)


def keep_bits(streams: list[TorchRand], densities: list[float], keep, rows: list[int], bit0: int, n: int) -> None:
    """The next n draws of each stream i as its `keep` would apply them (rand < densities[i]), as
    bits bit0 … bit0 + n − 1 of row rows[i] of the uint8 array keep (entry j: byte j >> 3, bit j & 7;
    those bits zero before); the streams drawn side by side, one thread each."""
    states = np.stack([s.state for s in streams])
    positions = np.asarray([s.pos for s in streams], dtype=np.int64)
    thresholds = np.asarray([threshold(d) for d in densities], dtype=np.int64)
    fused.mt_keep_bits_each(states, positions, thresholds, True, keep, np.asarray(rows, dtype=np.int64), bit0, n)
    for s, state, pos in zip(streams, states, positions):
        s.state[:] = state
        s.pos = int(pos)


def _reference_draws(seed: int, n: int) -> list[float]:
    """The first n float32 draws of MT19937 seeded by init_genrand(seed's low 32 bits), each output's
    low 24 bits × 2⁻²⁴: the reference algorithm in Python, to check torch against without numba
    (its kernels are checked against torch by tests/test_torch_rand.py)."""
    mt = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    out: list[float] = []
    while len(out) < n:
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        for y in mt:
            y ^= y >> 11
            y ^= (y << 7) & 0x9D2C5680
            y ^= (y << 15) & 0xEFC60000
            y ^= y >> 18
            out.append((y & 0xFFFFFF) / (1 << 24))
    return out[:n]


def _agrees() -> bool:
    """torch draws as the reference does: seeds past 2³², two calls (the state running on), past the
    first 624 words."""
    for seed in (0, 2**40 + 12345):
        g = torch.Generator().manual_seed(seed)
        drawn = torch.cat([torch.rand(1000, generator=g), torch.rand(3, 100, generator=g).view(-1)])
        if drawn.tolist() != _reference_draws(seed, 1300):
            return False
    return True


def available() -> bool:
    """numba is present and the installed torch draws as MT19937's reference does (checked once per
    process, without loading numba: a plan asks this too)."""
    global _checked
    if not fused.installed():
        return False
    if _checked is None:
        _checked = _agrees()
    return _checked


def stream(generator: torch.Generator, numel: int) -> TorchRand | None:
    """A TorchRand giving the draws `generator` (a CPU generator just seeded, no draws made yet)
    would for a tensor of `numel` entries, or None without numba, where torch draws differently
    (see above), or for a tensor the kernels do not take (below fused.MIN_ELEMENTS): torch's own
    generator then makes the same draws without loading numba's runtime, which a plan counts only
    for the tensors the kernels take (methods/dare.py memory)."""
    return TorchRand(generator.initial_seed()) if numel >= fused.MIN_ELEMENTS and available() else None
