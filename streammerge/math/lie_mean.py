"""Merging rotations: in the Lie algebra so(n) (OrthoMerge) and the paper's ablations.

OrthoMerge's magnitude-corrected mean (paper eq. 7–8), norms over the whole weight matrix:
    Q* = (1/N) · (Σ‖Q_i‖_F / ‖Σ Q_i‖_F) · Σ Q_i        so ‖Q*‖_F = mean_i ‖Q_i‖_F.
Generalised with per-expert weights w_i and the authors' variants:
    Q* = scale · m · D / ‖D‖_F
    D = Σ w_i Q_i (direction "sum") or Σ w_i Q_i/‖Q_i‖ ("uniform");
    m = Σ w_i‖Q_i‖ / Σ w_i ("mean"), or the median / max of ‖Q_i‖.
‖D‖ = 0 (all generators zero, or cancelling exactly) gives Q* = 0, never NaN.
For equal-norm, mutually orthogonal generators this is ΣQ_i/√N; for identical ones, Q_i.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from .cayley import cayley

TINY = 1e-30


@dataclass
class LieAccumulator:
    """Streams generators one at a time; holds Σ w_i Q_i (or its uniform variant) and the norms."""

    direction: str = "sum"  # or "uniform"
    total: torch.Tensor | None = None
    plain_total: torch.Tensor | None = None  # Σ w_i Q_i, for the "average_q" ablation
    norms: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    chunk_rows: int | None = None  # framed terms added this many rows at a time (no [k, w] product)

    def add(self, q: torch.Tensor, weight: float = 1.0, frame: torch.Tensor | None = None) -> None:
        """Add Q_i, or with `frame` F [k, w] (orthonormal columns) the generator F Q_i Fᵀ given
        its w×w core q, without forming that k×k matrix (‖F Q Fᵀ‖_F = ‖Q‖_F)."""
        norm = float(torch.linalg.vector_norm(q))  # Frobenius over the whole matrix (all blocks)
        self.norms.append(norm)
        self.weights.append(weight)
        coef = weight if self.direction == "sum" else (weight / norm if norm > TINY else 0.0)
        self.total = self._accumulate(self.total, q, coef, frame)
        if self.direction != "sum":  # with "sum", total is Σ w_i Q_i already: no second k×k sum
            self.plain_total = self._accumulate(self.plain_total, q, weight, frame)

    def _accumulate(
        self, total: torch.Tensor | None, q: torch.Tensor, coef: float, frame: torch.Tensor | None
    ) -> torch.Tensor:
        if frame is None:
            term = q * coef
            return term if total is None else total.add_(term)
        if total is None:
            total = q.new_zeros(frame.shape[0], frame.shape[0])
        if self.chunk_rows is None:
            return total.addmm_(frame @ (q * coef), frame.T)
        scaled = q * coef
        for start in range(0, frame.shape[0], self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            total[rows].addmm_(frame[rows] @ scaled, frame.T)
        return total

    def magnitude(self, kind: str) -> float:
        if kind == "mean":
            s = sum(self.weights)
            return sum(w * n for w, n in zip(self.weights, self.norms)) / s if s else 0.0
        if kind == "median":
            return float(statistics.median(self.norms))
        if kind == "max":
            return max(self.norms)
        raise ValueError(f"unknown magnitude {kind!r}")

    def magnitude_corrected(self, magnitude: str = "mean", scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
        """Q*; `in_place`: in the sum's own storage (a k×k matrix less; the sum is gone)."""
        assert self.total is not None, "no generator added"
        d_norm = float(torch.linalg.vector_norm(self.total))
        if d_norm <= TINY:
            return self.total.zero_() if in_place else torch.zeros_like(self.total)
        coef = scale * self.magnitude(magnitude) / d_norm
        return self.total.mul_(coef) if in_place else self.total * coef

    def simple_average(self, scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
        """The "Simple Average Q" ablation: Σ w_i Q_i / Σ w_i."""
        plain = self.plain_total if self.plain_total is not None else self.total
        assert plain is not None, "no generator added"
        s = sum(self.weights)
        coef = scale / s if s else 0.0
        return plain.mul_(coef) if in_place else plain * coef


def magnitude_corrected_mean(
    qs: list[torch.Tensor],
    weights: list[float] | None = None,
    magnitude: str = "mean",
    direction: str = "sum",
    scale: float = 1.0,
) -> torch.Tensor:
    """All-at-once form of LieAccumulator, for tests and small uses."""
    acc = LieAccumulator(direction)
    for i, q in enumerate(qs):
        acc.add(q, 1.0 if weights is None else weights[i])
    return acc.magnitude_corrected(magnitude, scale)


def merged_rotation(q_star: torch.Tensor) -> torch.Tensor:
    return cayley(q_star)
