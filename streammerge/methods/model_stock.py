"""model_stock: interpolate between the base and the experts' average by how much the experts'
task vectors agree (Jang et al., 2024; mergekit 0.1.5's `model_stock`, at least two experts).

    cos θ = mean over expert pairs of ⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6),
    t = N cos θ / (1 + (N−1) cos θ)   (t = 0 where the denominator is below 1e-6),
    W = t · (Σ W_i / N) + (1 − t) · W_0,
over the flattened tensor, or per row with `filter_wise`.

Streaming: a tensor whose N task vectors fit `WHOLE_BYTES` is merged whole, exactly as mergekit
does. A larger one (a 128k-vocabulary embedding) goes in row blocks: `filter_wise` is row-local;
otherwise one pass sums the pairwise products ⟨τ_i, τ_j⟩ over the blocks (float64), then a
second pass interpolates each block with the tensor's t. The streamed t equals the whole
tensor's to float32 round-off (its sums run in float64), so the working set is N blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import math

from ..plan import Need
from .base import BLOCK_ELEMENTS, Method, Rows, TensorTask, holds_whole, map_row_blocks, ordered_sum

WHOLE_BYTES = 1 << 28  # the N task vectors of one tensor are held whole up to this size


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False


def interpolation(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos θ / (1 + (N−1) cos θ), 0 where the denominator is below 1e-6."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(
        singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    )


def merge_whole(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """mergekit's arithmetic on in-memory tensors (all of a tensor, or whole rows with filter_wise)."""
    n = len(ws)
    if filter_wise:
        w0v = w0.unsqueeze(0) if w0.dim() == 1 else w0
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in ws]
    else:
        w0v = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0v for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            if a.dim() == 1:  # one sum over the whole tensor: in a fixed order (methods.ordered_sum)
                norm, dot = ordered_sum(a * a).sqrt() * ordered_sum(b * b).sqrt(), ordered_sum(a * b)
            else:
                norm, dot = torch.norm(a, dim=-1) * torch.norm(b, dim=-1), (a * b).sum(dim=-1)
            cosines.append((dot / norm.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    t = interpolation(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0v).reshape(shape)


def merge(task: TensorTask, params: ModelStockParams) -> torch.Tensor:
    n = len(task.weights)
    if n < 2:
        raise ValueError("model_stock needs at least two experts besides the base")
    if holds_whole(task, n, WHOLE_BYTES):
        return merge_whole(task.base, [task.experts[i] for i in range(n)], params.filter_wise, task.shape)

    def block_of(rows: Rows | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return task.base_rows(rows), [task.expert_rows(i, rows) for i in range(n)]

    if params.filter_wise:  # every row whole in its block: row-local
        return map_row_blocks(
            task, lambda rows: merge_whole(*block_of(rows), True, (rows[1] - rows[0], *task.shape[1:]))
        )  # type: ignore[index]
    products = torch.zeros(n, n, dtype=torch.float64)
    for rows in task.row_blocks():
        w0, ws = block_of(rows)
        taus = torch.stack([w.reshape(-1) - w0.reshape(-1) for w in ws]).to(torch.float64)
        products += (taus @ taus.T).cpu()
        del taus, ws
    norms = products.diagonal().sqrt()
    cosines = [
        (products[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for i in range(n) for j in range(i + 1, n)
    ]
    t = float(interpolation(torch.stack(cosines).mean().to(torch.float32), n))

    def block(rows: Rows | None) -> torch.Tensor:
        w0, ws = block_of(rows)
        return t * (sum(ws) / n) + (1 - t) * w0

    return map_row_blocks(task, block)


def memory(name: str, shape: tuple[int, ...], n: int, params: ModelStockParams, itemsize: int):
    """Whole: about 4 + 2N copies of the tensor (the peak holds the base, N experts, N offsets and a
    product, 2N + 2; two more for the blend's temporaries); streamed: N blocks, their float64 stack
    and a few temporaries."""

    numel = math.prod(shape)
    if numel <= BLOCK_ELEMENTS or n * numel * itemsize <= WHOLE_BYTES:
        return Need(int((4 + 2 * n) * numel * itemsize))
    block = BLOCK_ELEMENTS
    return Need(int((3 * n + 6) * block * itemsize), transfer=block)


METHOD = Method(
    "model_stock",
    ModelStockParams,
    merge,
    memory=memory,
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params={},
)
