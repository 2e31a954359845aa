"""What the four spectral methods (TSV-M, iso_c, iso_cts, ortho_svd) share over a `TensorTask`:
the noise floor, task-vector sums and SVDs, the polar factor of streamed left vectors, and one
`merge` that sends each tensor down its path (math/spectral.py holds the pure functions and the
conventions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..math.spectral import compact_svd, inverse_sqrt, linalg_dtype, low_rank_svd, polar_factor, top_eig
from .base import Cost, Method, TensorTask, auto_precision_on_gpu, map_row_blocks


def noise_floor(task) -> float:
    """4·eps·rms(W₀)·(√m + √n): the σ_max of W₀'s rounding errors in the task vectors' dtype."""
    m, n = task.shape
    base = task.base
    rms = float(base.double().square().mean().sqrt()) if base.numel() else 0.0
    return 4 * torch.finfo(task.dtype).eps * rms * (m**0.5 + n**0.5)


def setup(task, precision: str) -> tuple[torch.dtype, float]:
    """(the linear-algebra dtype, the noise floor) of one 2-D tensor's merge."""
    return linalg_dtype(precision, task.shape, task.base.device), noise_floor(task)


def task_svd(task, i: int, dtype: torch.dtype, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compact_svd(τ_i), from a LoRA expert's factors when it has them."""
    factors = task.task_factors(i)
    if factors is not None:
        b, a = factors
        if b.shape[1] == 0:
            return b.to(dtype), torch.zeros(0, dtype=dtype, device=b.device), a.to(dtype)
        return low_rank_svd(b.to(dtype), a.to(dtype), floor)
    return compact_svd(task.task_vector(i).to(dtype), floor)


def task_sum(task, rows=None) -> torch.Tensor:
    """Σ τ_i (of a row block, if given), one expert at a time."""
    total = task.task_vector(0, rows)
    for i in range(1, len(task.weights)):
        total.add_(task.task_vector(i, rows))
    return total


def mean_update(task, alpha: float) -> torch.Tensor:
    """W₀ + α · mean τ_i: what every spectral method does with tensors that are not 2-D."""
    return task.base + task_sum(task).mul_(alpha / len(task.weights))


def expert_right_vectors(task, floor: float, limit: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each τ_i's leading right singular vectors and values from its Gram matrix τ_iᵀτ_i, summed
    over row blocks, one expert at a time (one read of each)."""
    cols = task.shape[1]
    out = []
    for i in range(len(task.weights)):
        gram = None
        for rows in task.row_blocks():
            t = task.task_vector(i, rows).to(dtype)
            gram = t.T @ t if gram is None else gram.addmm_(t.T, t)
            del t
        out.append(top_eig(gram if gram is not None else torch.zeros(cols, cols, dtype=dtype), floor, limit))
        del gram
    return out


def streams_tall(task) -> bool:
    """A tall 2-D tensor larger than one row block: merged through Gram matrices, block by block."""
    return task.row_blocks() != [None] and task.shape[0] >= task.shape[1]


def polar_blocks(task, left, vhs: list[torch.Tensor], sigma: torch.Tensor, alpha: float):
    """W₀ + α · polar(L) diag(σ) polar(Vᵀ) for a tall tensor whose concatenated left vectors L
    come block by block from `left(rows)`: polar(L) = L (LᵀL)^(-1/2), LᵀL summed over the
    blocks (one pass), then the output blocks (another)."""
    ltl = None
    for rows in task.row_blocks():
        lb = left(rows)
        ltl = lb.T @ lb if ltl is None else ltl.addmm_(lb.T, lb)
        del lb
    right = (inverse_sqrt(ltl) * sigma) @ polar_factor(torch.cat(vhs, dim=0))
    del ltl
    return map_row_blocks(task, lambda rows: task.base_rows(rows) + (left(rows) @ right).mul_(alpha).to(task.dtype))


# Wide 2-D tensors (m < n) with more elements than this go through m×m Gram matrices, one
# expert at a time, where a method has that path (`wide`): a Llama-3-70B down_proj (8192×28672,
# 235 M elements) would otherwise hold its whole SVD factors (#29). Every 8B tensor is below it,
# so 8B merges keep the whole path's bytes.
WIDE_GRAM_ELEMENTS = 1 << 27


def gram_wide(task) -> bool:
    """A wide 2-D tensor above WIDE_GRAM_ELEMENTS: merged through its m×m Gram matrices."""
    m, n = task.shape
    return m < n and m * n > WIDE_GRAM_ELEMENTS


def column_chunks(shape: tuple[int, ...]) -> list[slice]:
    """Column ranges of a wide [m, n] matrix, about BLOCK_ELEMENTS each: what a Gram-matrix pass
    converts to float64 at once."""
    from . import base

    m, n = shape
    step = max(1, base.BLOCK_ELEMENTS // max(1, m))
    return [slice(c, min(c + step, n)) for c in range(0, n, step)]


def dispatch(task, alpha: float, precision: str, tall, whole, wide=None):
    """The shape of every spectral method: not 2-D → W₀ + α·mean τ_i; tall and larger than a
    block → `tall(floor)`; wide and above WIDE_GRAM_ELEMENTS → `wide(floor)` (methods with
    that path); otherwise `whole(dtype, floor)`."""
    if len(task.shape) != 2:
        return mean_update(task, alpha)
    if streams_tall(task):
        return tall(noise_floor(task))
    if wide is not None and gram_wide(task):
        return wide(noise_floor(task))
    return whole(*setup(task, precision))


def spectral_merge(
    tall: Callable[..., torch.Tensor], whole: Callable[..., torch.Tensor], wide: Callable[..., torch.Tensor] | None
) -> Callable[[TensorTask, Any], torch.Tensor]:
    """A spectral method's `merge`: `tall(task, params, floor)` for tall tensors larger than a
    block, `wide(task, params, floor)` (if given) for wide ones above WIDE_GRAM_ELEMENTS,
    `whole(task, params, dtype, floor)` for other 2-D tensors, W₀ + α·mean τ_i otherwise."""

    def merge(task: TensorTask, params: Any) -> torch.Tensor:
        return dispatch(
            task,
            params.alpha,
            params.precision,
            lambda floor: tall(task, params, floor),
            lambda dtype, floor: whole(task, params, dtype, floor),
            None if wide is None else (lambda floor: wide(task, params, floor)),
        )

    return merge


def spectral_method(name: str, params_type: type, tall, whole, memory, doc: str, wide=None) -> Method:
    """The declaration the four spectral methods share: one `merge` (spectral_merge), precision
    "auto" as float32 on a GPU, NaN carried to the result, no per-expert values."""
    merge = spectral_merge(tall, whole, wide)
    return Method(name, params_type, merge, memory=memory, for_device=auto_precision_on_gpu, doc=doc,
                  propagates_nonfinite=True, expert_params={}, cost=cost)  # fmt: skip


def cost(name: str, shape: tuple[int, ...], n: int, params: Any) -> Cost:
    """About one SVD per expert and two more (the sum or polar factors) of each 2-D tensor."""
    if len(shape) != 2:
        return Cost()
    m, k = shape
    return Cost(passes=4.0, factorisation=(n + 2) * m * k * min(m, k))
