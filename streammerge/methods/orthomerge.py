"""orthomerge: merging on the orthogonal group with orthogonal–residual decoupling
(Yang, Shi & Liu 2026, Algorithm 2), for full fine-tunes and merged-LoRA experts.

Per 2-D weight W₀ [out, in] (rotations act on the input side, see math/procrustes.py):
  target  "global":   W_i^target = W_i                                   (eq. 9)
          "conflict": keep row j of τ_i = W_i − W₀ only where cos(τ_i[j], τ_mean[j]) < 0,
                      W_i^target = W₀ + τ_i^conf                         (eq. 10–11)
  R_i     = Procrustes(W_i^target, W₀), in the base's used subspace       (eq. 12)
  Q_i     = inverse Cayley(R_i);  Q* = magnitude-corrected mean           (eq. 5, 7–8)
  ρ_i     = W_i − W₀ R_iᵀ, merged by a Euclidean method (default TA, λ = 1/N)  (eq. 13)
  W       = W₀ R*ᵀ + merge(ρ)                                             (eq. 14)
1-D tensors (norms, biases), >2-D tensors and names matching `exclude` get the residual merge
only (their ρ_i is τ_i). Streaming: τ_mean is a running sum (pass 1); pass 2 holds one expert
plus the k×k rotations R_i (k ≤ min(out, in)) that the residual pass (3) needs.

`rotation_merge` selects the paper's Table 4 ablations: "average_r" (Σ w_i R_i/Σ w_i, not
orthogonal), "product_r" (R_N···R_1), "average_q" (Σ w_i Q_i/Σ w_i, no magnitude correction).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NumericalError, UsageError
from ..math import lapack, side_by_side
from ..math.cayley import cayley, cayley_consuming
from ..math.lie_mean import LieAccumulator
from ..math.robust import LinalgFailure
from ..math.procrustes_wide import CHUNK_ELEMENTS, SubspaceBuffer, cayley_moved_base, frame_rotation, moved_base
from ..math.procrustes import (
    Subspace,
    SubspaceBuilder,
    SubspaceRotation,
    identity_rotation,
    procrustes,
    procrustes_from_cross,
    rotate_base,
    transpose_minus_identity,
)
from ..plan import Need
from .base import (
    BLOCK_ELEMENTS,
    Cost,
    check_choice,
    PRECISIONS,
    auto_precision_on_gpu,
    Method,
    Rows,
    TensorTask,
    build_params,
    check_range,
    map_row_blocks,
)
from .registry import get_method

log = logging.getLogger(__name__)

ROTATION_MERGES = ("magnitude_corrected", "average_q", "average_r", "product_r")


@dataclass(frozen=True)
class OrthoMergeParams:
    target: str = "conflict"  # "global" (OrthoMerge-G) or "conflict" (OrthoMerge-C)
    residual_method: str = "task_arithmetic"
    residual: dict[str, Any] = field(default_factory=dict)  # its parameters; TA's lambda defaults to 1/N
    rotation_merge: str = "magnitude_corrected"
    magnitude: str = "mean"  # merged ‖Q*‖: mean, median or max of ‖Q_i‖
    direction: str = "sum"  # Σ w_i Q_i ("sum", norm-weighted) or Σ w_i Q_i/‖Q_i‖ ("uniform")
    scale: float = 1.0  # multiplies Q*: separates the method from its scale in benchmarks
    exclude: tuple[str, ...] = ()  # regexes of 2-D tensor names merged without rotation
    base_rtol: float = 1e-2  # base directions with σ below this × σ_max get no rotation (procrustes rule 1)
    null_rtol: float = 1e-6  # cross-product singular values below this × σ_max: identity completion (rule 2)
    max_angle_deg: float = 90.0  # invariant planes rotated further are reset (residual keeps them)
    precision: str = "auto"  # dtype of the SVDs and k×k solves: float32, float64, or auto (linalg_dtype)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "residual", dict(self.residual))
        check_choice("target", self.target, ("global", "conflict"))
        check_choice("rotation_merge", self.rotation_merge, ROTATION_MERGES)
        check_choice("magnitude", self.magnitude, ("mean", "median", "max"))
        check_choice("direction", self.direction, ("sum", "uniform"))
        check_choice("precision", self.precision, PRECISIONS)
        check_range("scale", self.scale, 0.0, float("inf"))
        check_range("base_rtol", self.base_rtol, 0.0, 1.0, high_open=True)
        check_range("null_rtol", self.null_rtol, 0.0, 1.0, high_open=True)
        check_range("max_angle_deg", self.max_angle_deg, 0.0, 180.0, low_open=True, high_open=True)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude pattern {pattern!r}: {exc}") from None
        residual_method(self, 2)  # validates the residual method and its parameters now


# precision "auto": float64 where the subspace is small enough for it to be cheap, float32 above
# (an 8B down_proj has k = 14,336: float64 would need 17 GB, float32 9 GB; the update differs by
# ~1e-4 relative, bench/results/orthomerge-precision.md). Method.for_device turns auto into float32
# on CUDA, where float64 runs at 1/32–1/64 of the speed on consumer GPUs.
AUTO_FLOAT64_MAX_K = 4096


def subspace_bound(shape: tuple[int, ...], n: int) -> int:
    """k = dim S for full-rank updates: min(in, min(out, in) + N·out) (an upper bound for the conflict target)."""
    out, inn = shape
    return min(inn, min(out, inn) + n * out)


def linalg_dtype(params: OrthoMergeParams, shape: tuple[int, ...], n: int) -> torch.dtype:
    if params.precision != "auto":
        return getattr(torch, params.precision)
    return torch.float64 if subspace_bound(shape, n) <= AUTO_FLOAT64_MAX_K else torch.float32


def residual_method(params: OrthoMergeParams, n_experts: int) -> tuple[Method, Any]:
    if params.residual_method == "orthomerge":
        raise ValueError("residual_method cannot be orthomerge")
    try:
        method, implied = get_method(params.residual_method)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    if method.statistics is not None and params.residual.get("scope") == "model":
        raise ValueError("residual ties with scope=model is not supported; use scope=tensor")
    values = {**implied, **params.residual}
    if method.name == "task_arithmetic" and "lambda" not in values and "lambda_" not in values:
        values["lambda"] = 1.0 / n_experts  # the authors' default
    try:
        return method, build_params(method.params_type, values, f"residual method {method.name}")
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def log_clipped(task: TensorTask, i: int, planes: int, params: OrthoMergeParams) -> None:
    log.info("%s: expert %d: %d plane(s) rotated beyond %.0f° left to the residual", task.name, i + 1, planes,
             params.max_angle_deg)  # fmt: skip


def check_experts(params: OrthoMergeParams, experts: tuple[dict[str, Any], ...]) -> None:
    """A per-expert density is the residual method's: refused where that method takes none."""
    if any(e.get("density") is not None for e in experts):
        method, _ = get_method(params.residual_method)
        if "density" not in method.expert_params:
            raise ValueError(
                f"density is a parameter of the residual method, and {method.name} takes none "
                "(e.g. --residual-method ties)"
            )


def cost(name: str, shape: tuple[int, ...], n: int, params: OrthoMergeParams) -> Cost:
    """The work of one weight (the time estimate of `plan`): tall weights in row blocks form a Gram
    matrix and N cross products over the blocks and solve in×in problems; the others take the base's
    SVD, one per target for the subspace, and N Procrustes solves in a frame of width ≤ 2·out. The N
    solves are `paired`: the plan may run two at a time (math/side_by_side.py)."""
    if not rotates(name, shape, params):
        return Cost()
    out, inn = shape
    if out >= inn and out * inn > BLOCK_ELEMENTS:
        solves = n * inn**3
        return Cost(passes=4.0, flops=2.0 * out * inn * inn * (n + 2), factorisation=inn**3 + solves, paired=solves)
    width = min(subspace_bound(shape, n), 2 * min(out, inn))
    solves = n * width**3
    svds = out * inn * min(out, inn) * (n + 1) + solves
    return Cost(passes=4.0, flops=4.0 * n * out * inn * width, factorisation=svds, paired=solves)


def rotates(name: str, shape: torch.Size, params: OrthoMergeParams) -> bool:
    return len(shape) == 2 and min(shape) > 0 and not any(re.search(p, name) for p in params.exclude)


class _Residuals:
    """Pseudo-experts W₀ + ρ_i = W_i − (W₀R_iᵀ − W₀), loaded lazily like real experts."""

    def __init__(self, task: TensorTask, basis: Subspace, rotations: list):
        # rotations[i]: R_i, or the out×in difference W₀R_iᵀ − W₀ itself where that is smaller
        self.task, self.basis, self.rotations = task, basis, rotations

    def __len__(self) -> int:
        return len(self.rotations)

    def __getitem__(self, i: int) -> torch.Tensor:
        w = self.task.experts[i]
        kept = self.rotations[i].to(self.basis.p.device)  # state may have been kept in host RAM
        if isinstance(kept, torch.Tensor):
            return w.sub_(kept)
        return w.sub_(rotate_base(self.task.base, self.basis, kept).sub_(self.task.base))


class _ResidualRows:
    """Pseudo-experts W₀ + ρ_i = W_i − A_blk D_i for a row-blocked tall weight, each row block
    from the expert's and the base's rows and D_i = P(R_iᵀ − I)Pᵀ [in, in] (_rotation_step)."""

    def __init__(self, task: TensorTask, steps: list[torch.Tensor]):
        self.task, self.steps = task, steps

    def __len__(self) -> int:
        return len(self.steps)

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        a = self.task.base_rows((start, stop))
        w = self.task.expert_rows(i, (start, stop))
        return w.sub_((a.to(self.steps[i].dtype) @ self.steps[i]).to(w.dtype))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows(i, 0, self.task.shape[0])


def _rotation_step(p: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """D = P(Rᵀ − I)Pᵀ [in, in], so that W₀Rᵀ − W₀ = W₀ D for R = P R_s Pᵀ + (I − PPᵀ): one
    product per row block (forming W₀P and then two more per block cost three times as much)."""
    return (p @ transpose_minus_identity(rot)) @ p.T


# Tall weights (out ≥ in) bigger than one row block are merged in row blocks: the base's
# right singular vectors and values come from its Gram matrix AᵀA (float64 or `precision`,
# summed over blocks), each cross product M_i = Pᵀ B_iᵀ A P is summed over blocks, and only
# in×in matrices are held. Valid when the base has full column rank (then no target adds a
# direction to S, rule 1); a base whose σ_min is below this fraction of σ_max goes whole.
GRAM_RANK_RTOL = 1e-6


def pairs_on_cpu(task: TensorTask, device: torch.device) -> bool:
    """Two experts' solves side by side (math/side_by_side.py): where the plan counted the second
    (TensorTask.side_by_side) and the CPU computes on two threads or more."""
    return task.side_by_side and device.type == "cpu" and torch.get_num_threads() >= 2


def tall_in_blocks(task: TensorTask) -> bool:
    return len(task.shape) == 2 and task.shape[0] >= task.shape[1] and len(task.row_blocks()) > 1


def _merge_tall(task: TensorTask, params: OrthoMergeParams, res_method: Method, res_params: Any) -> torch.Tensor | None:
    """OrthoMerge of a tall weight in row blocks; None if the base is rank-deficient (the caller
    then merges it whole)."""
    n = len(task.weights)
    out_rows, inn = task.shape
    prec = linalg_dtype(params, task.shape, n)
    blocks = task.row_blocks()
    device = task.base_rows(blocks[0]).device
    gram = torch.zeros(inn, inn, dtype=prec, device=device)
    conflict = (
        [torch.zeros(out_rows, dtype=torch.bool, device=device) for _ in range(n)]
        if params.target == "conflict"
        else None
    )
    steps = 3 * len(blocks) + n  # progress: two passes over the blocks, n solves, the output blocks
    for j, rows in enumerate(blocks):  # pass 1: AᵀA, and (conflict) each expert's rows that oppose τ_mean
        task.advance(j, steps)
        a = task.base_rows(rows).to(prec)
        gram.addmm_(a.T, a)
        del a
        if conflict is not None:
            for i, rows_i in enumerate(conflicts_among([task.task_vector(i, rows) for i in range(n)])):
                conflict[i][rows[0] : rows[1]] = rows_i  # type: ignore[index]
    evals, evecs = lapack.eigh(gram)
    del gram
    sigma = evals.clamp_(min=0).sqrt_()
    top = float(sigma.max()) if sigma.numel() else 0.0
    if top == 0.0 or float(sigma.min()) <= GRAM_RANK_RTOL * top:
        log.info("%s: base not of full column rank: merged whole", task.name)
        return None
    p = evecs[:, sigma > params.base_rtol * top].contiguous()
    del evecs
    # pass 2: M_i = Pᵀ (Σ_blocks B_iᵀ A) P, B_i the target rows: one in×in product per block
    # and expert (two, with P applied per block)
    crosses = [torch.zeros(inn, inn, dtype=prec, device=device) for _ in range(n)]
    changed = [False] * n
    for j, rows in enumerate(blocks):
        task.advance(len(blocks) + j, steps)
        a = task.base_rows(rows).to(prec)
        for i in range(n):
            delta = task.task_vector(i, rows)
            if conflict is not None:
                delta.mul_(conflict[i][rows[0] : rows[1]].unsqueeze(1))  # type: ignore[index]
            if bool(delta.any()):
                changed[i] = True
            crosses[i].addmm_(delta.to(prec).add_(a).T, a)
            del delta
        del a
    for i in range(n):
        crosses[i] = (p.T @ crosses[i]) @ p
    if not any(changed):  # every target is the base: the residual merge alone (as whole)
        task.note("rotation_share", 0.0)
        if conflict is not None:
            task.note("conflict_row_fraction", [float(c.float().mean()) for c in conflict])
        return res_method.merge(task, res_params)
    acc = LieAccumulator(params.direction)
    max_angle = math.radians(params.max_angle_deg)
    rotations = []
    clipped = 0

    def cross(i: int) -> torch.Tensor | None:
        task.advance(2 * len(blocks) + i, steps)
        m, crosses[i] = crosses[i], None  # type: ignore[call-overload]  # freed with its solve
        return m if changed[i] else None

    def solve(m: torch.Tensor | None) -> SubspaceRotation:
        if m is None:  # the target is the base: exactly no rotation
            eye = torch.eye(p.shape[1], dtype=prec, device=device)
            return SubspaceRotation(eye, torch.zeros_like(eye))
        return procrustes_from_cross(m, params.null_rtol, max_angle)

    for i, rot in side_by_side.each(n, cross, solve, pairs_on_cpu(task, device)):
        clipped += rot.clipped_planes
        if rot.clipped_planes:
            log_clipped(task, i, rot.clipped_planes, params)
        acc.add(rot.q_w, task.weights[i])
        rotations.append(rot.r_w)
        del rot
    fractions = {i: float(c.float().mean()) for i, c in enumerate(conflict)} if conflict is not None else {}
    note_rotation(task, params, acc, clipped, fractions, p.shape[1])  # before merged_rotation consumes acc
    r_star = merged_rotation(acc, rotations, task.weights, params)
    del acc
    rotation_steps = [_rotation_step(p, r) for r in rotations]
    del rotations
    residual_task = TensorTask(
        task.name,
        lambda rows: task.base_rows(rows) if rows is not None else task.base,
        _ResidualRows(task, rotation_steps),
        task.weights,
        task.densities,
        None,
        task.seed,
        out_dtype=task.dtype,
        shape=task.shape,
        dtype=task.dtype,
    )
    merged_residual = res_method.merge(residual_task, res_params)
    del rotation_steps, residual_task
    step_star = _rotation_step(p, r_star)
    del r_star
    share = [0.0, 0.0]  # Σ‖W₀R*ᵀ − W₀‖², Σ‖merged residual − W₀‖² over the blocks (--report)

    def merged_block(rows: Rows | None) -> torch.Tensor:  # W = W₀ + W₀D* + (merged residual − W₀)
        a = task.base_rows(rows)
        turn = (a.to(prec) @ step_star).to(a.dtype)
        residual = merged_residual[rows[0] : rows[1]].to(a.device).sub_(a)  # type: ignore[index]
        if task.diagnostics is not None:
            share[0] += float(turn.square().sum())
            share[1] += float(residual.square().sum())
        return turn.add_(a).add_(residual)

    out = map_row_blocks(task, merged_block)
    r_norm, s_norm = math.sqrt(share[0]), math.sqrt(share[1])
    task.note("rotation_share", r_norm / (r_norm + s_norm) if r_norm + s_norm else 0.0)
    return out


def rotation_bytes(rot: SubspaceRotation) -> int:
    return sum(t.numel() * t.element_size() for t in (rot.r_w, rot.q_w, rot.frame) if t is not None)


def conflict_rows(tau: torch.Tensor, tau_mean: torch.Tensor) -> torch.Tensor:
    """Rows j with cos(τ[j], τ_mean[j]) < 0; a zero row has cosine 0 and is not a conflict."""
    return (tau * tau_mean).sum(dim=1) < 0


def conflicts_among(taus: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each τ_i's conflicting rows against the mean of `taus` (all of the experts' rows of one
    block; the mean is formed in the same operations as _merge's, so the rows are the same)."""
    tau_mean = torch.zeros_like(taus[0])
    for t in taus:
        tau_mean.add_(t)
    tau_mean.div_(len(taus))
    return [conflict_rows(t, tau_mean) for t in taus]


class _Targets:
    """W_i^target − W₀ per expert: τ_i, or (conflict) only its rows that oppose τ_mean, which is
    summed when this is made; `fraction[i]`: expert i's share of conflicting rows."""

    def __init__(self, task: TensorTask, params: OrthoMergeParams):
        self.task, self.mean, self.fraction = task, None, {}
        if params.target == "conflict":
            n = len(task.weights)
            self.mean = torch.zeros_like(task.base)
            for i in range(n):
                self.mean.add_(task.task_vector(i))
            self.mean.div_(n)

    def delta(self, i: int) -> torch.Tensor:
        tau = self.task.task_vector(i)
        if self.mean is None:
            return tau
        rows = conflict_rows(tau, self.mean)
        self.fraction[i] = float(rows.float().mean())
        return tau.mul_(rows.unsqueeze(1))

    def capacity(self, n: int) -> int:
        """The most directions the targets can add to S: the bound for full-rank updates or, with the
        conflict target, what its conflicting rows (or a LoRA expert's A rows) can add, counted
        as the plan's statistics pass counts them (measured_subspace)."""
        bound = subspace_bound(self.task.shape, n)
        if self.mean is None:
            return bound
        conflicts, ranks = [], []
        for i in range(n):
            conflicts.append(int(conflict_rows(self.task.task_vector(i), self.mean).sum()))
            factors = self.task.task_factors(i)
            ranks.append(None if factors is None else int(factors[1].shape[0]))
        return min(bound, measured_subspace(self.task.shape, {"conflicts": conflicts, "ranks": ranks}))


# Wide weights whose rotation subspace may exceed this many dimensions take the lean path
# (math/procrustes_wide.py): a 70B down_proj (k up to 28,672, 3.3 GB per k×k float32 matrix)
# would need 37 GB on the whole path. Every 8B weight is below it (down_proj: k ≤ 14,336), so 8B
# merges keep the whole path's bytes; where both run, they agree to float32 round-off.
LEAN_WIDE_K = 16384


def lean_wide(shape: tuple[int, ...], n: int, params: OrthoMergeParams) -> bool:
    """A wide 2-D weight above LEAN_WIDE_K, merged by a rule with one generator sum (the R-space
    ablations keep N dense rotations, so they stay on the whole path, planned as such)."""
    return (
        len(shape) == 2
        and 0 < shape[0] < shape[1]
        and subspace_bound(shape, n) > LEAN_WIDE_K
        and params.rotation_merge in ("magnitude_corrected", "average_q")
    )


def _merge_wide_lean(task: TensorTask, params: OrthoMergeParams, res_method: Method, res_params: Any) -> torch.Tensor:
    """_merge's wide branch through procrustes_wide: the same S, rotations, Q* and residuals,
    without copying a k×k or [k, 2·out] matrix. Held: P [in, k], Σ w_i Q_i [k, k], A P and the QR
    of (A P)ᵀ, the running residual (or the N moved bases W₀R_iᵀ − W₀ as state), one expert's
    frame solve."""
    n = len(task.weights)
    prec = linalg_dtype(params, task.shape, n)
    a = task.base
    targets = _Targets(task, params)
    steps = 2 * n + 1
    builder, capacity = None, targets.capacity(n)  # the buffer's width: S never grows past it
    for i in range(n):
        task.advance(i, steps)
        delta = targets.delta(i)
        if not bool(delta.any()):
            continue
        if builder is None:
            builder = SubspaceBuffer(a, params.base_rtol, prec, capacity)
        if builder.full:
            break
        factors = task.task_factors(i)
        builder.add(delta if factors is None else factors[1])  # why the factors: see _merge
        del delta, factors
    if builder is None:  # every target is the base: the residual merge alone (as in _merge)
        task.note("rotation_share", 0.0)
        if targets.fraction:
            task.note("conflict_row_fraction", [targets.fraction.get(i, 0.0) for i in range(n)])
        return res_method.merge(task, res_params)
    basis = builder.build()
    del builder
    framed = 2 * task.shape[0] <= basis.k
    qy, ry = lapack.qr(basis.ap.T) if framed else (None, None)
    running = res_method.name == "task_arithmetic"
    acc = LieAccumulator(params.direction, chunk_rows=max(1, CHUNK_ELEMENTS // max(1, basis.k)))
    max_angle = math.radians(params.max_angle_deg)
    kept: list[torch.Tensor] = []
    residual_sum = None
    clipped = 0
    for i in range(n):
        task.advance(n + i, steps)
        delta = targets.delta(i)
        if not bool(delta.any()):
            rot = identity_rotation(basis)
        elif framed:
            x = delta.add_(a).to(prec) @ basis.p
            del delta
            rot = frame_rotation(x, qy, ry, params.null_rtol, max_angle)
            del x
        else:
            rot = procrustes(delta.add_(a), basis, params.null_rtol, max_angle)
        delta = None
        clipped += rot.clipped_planes
        if rot.clipped_planes:
            log_clipped(task, i, rot.clipped_planes, params)
        acc.add(rot.q_w, task.weights[i], rot.frame)
        moved = moved_base(a, basis, rot)  # W₀R_iᵀ − W₀
        del rot
        if running:  # τ of the pseudo-expert W₀ + ρ_i, summed at once (as in _merge)
            term = task.experts[i].sub_(moved).sub_(a)
            residual_sum = torch.zeros_like(a) if residual_sum is None else residual_sum
            residual_sum.add_(term, alpha=task.weights[i])
            del term
        else:
            kept.append(moved if task.state_device is None else moved.to(task.state_device))
        del moved
    del qy, ry
    note_rotation(task, params, acc, clipped, targets.fraction, basis.k)
    if params.rotation_merge == "magnitude_corrected":
        q_star = acc.magnitude_corrected(params.magnitude, params.scale, in_place=True)
    else:
        q_star = acc.simple_average(params.scale, in_place=True)
    acc.total = acc.plain_total = None
    if running:
        assert residual_sum is not None
        merged = residual_sum.mul_(res_params.lambda_).add_(a)
    else:
        merged = res_method.merge(
            TensorTask(task.name, a, _Residuals(task, basis, kept), task.weights, task.densities, None, task.seed),
            res_params,
        )
        del kept
    share = None
    if task.diagnostics is not None:
        share = [0.0]
        residual_norm = float((merged - a).norm())
    cayley_moved_base(q_star, basis, merged, share)  # W = merged residual + W₀R*ᵀ − W₀
    del q_star
    if share is not None:
        r_norm = math.sqrt(share[0])
        task.note("rotation_share", r_norm / (r_norm + residual_norm) if r_norm + residual_norm else 0.0)
    return merged


def merge(task: TensorTask, params: OrthoMergeParams) -> torch.Tensor:
    try:
        return _merge(task, params)
    except (LinalgFailure, torch.linalg.LinAlgError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NumericalError(
            f"tensor {task.name!r}: OrthoMerge's linear algebra failed after every fallback ({first}); "
            "the finished shards are kept — merge it without rotation with --exclude, or use --target conflict"
        ) from None


def _merge(task: TensorTask, params: OrthoMergeParams) -> torch.Tensor:
    n = len(task.weights)
    res_method, res_params = residual_method(params, n)
    if not rotates(task.name, task.shape, params):
        return res_method.merge(task, res_params)
    if task.generators is not None:
        return merge_oft(task, params)
    if tall_in_blocks(task):
        merged = _merge_tall(task, params, res_method, res_params)
        if merged is not None:
            return merged
    if lean_wide(task.shape, n, params):
        return _merge_wide_lean(task, params, res_method, res_params)
    a = task.base
    targets = _Targets(task, params)
    target_delta, conflict_fraction = targets.delta, targets.fraction

    builder = None  # S = span(rows of W₀ and of every target); built on the first target ≠ base
    steps = 2 * n + 1  # progress: n targets into S, n Procrustes solves, the residual merge
    for i in range(n):
        task.advance(i, steps)
        delta = target_delta(i)
        if not bool(delta.any()):
            continue  # adds no direction
        if builder is None:
            builder = SubspaceBuilder(a, params.base_rtol, linalg_dtype(params, task.shape, n))
        if builder.full:
            break
        factors = task.task_factors(i)
        # A LoRA expert's τ = B'A' lies in the row space of A' (r rows); its float32 copy does not:
        # rounding W₀ + B'A' spreads noise over every direction, which would grow S to the whole
        # input space (k = in) for nothing — R is the identity on directions neither W₀ nor the
        # target uses. A' spans every target row (conflicting rows are a subset of τ's rows).
        builder.add(delta if factors is None else factors[1])
    if builder is None:
        # every target is the base (no conflicting rows anywhere): every R_i and R* are exactly
        # the identity and ρ_i = τ_i, so this is the residual merge alone — without the SVDs
        task.note("rotation_share", 0.0)
        if conflict_fraction:
            task.note("conflict_row_fraction", [conflict_fraction.get(i, 0.0) for i in range(n)])
        return res_method.merge(task, res_params)
    basis = builder.build()
    del builder
    # With a task-arithmetic residual, ρ_i goes into a running sum as soon as R_i is known and
    # R_i is dropped: no per-expert state. Other residual methods (and the R-space ablations)
    # read every R_i again, so those are kept (the plan counts them as state).
    running = res_method.name == "task_arithmetic" and params.rotation_merge not in ("average_r", "product_r")
    rotations: list[SubspaceRotation] = []
    residual_sum = None
    acc = LieAccumulator(params.direction)
    max_angle = math.radians(params.max_angle_deg)
    clipped = 0

    def target(i: int) -> torch.Tensor | None:
        task.advance(n + i, steps)
        delta = target_delta(i)
        return delta.add_(a) if bool(delta.any()) else None  # None: the base, exactly no rotation

    def solve(wanted: torch.Tensor | None) -> SubspaceRotation:
        return identity_rotation(basis) if wanted is None else procrustes(wanted, basis, params.null_rtol, max_angle)

    for i, rot in side_by_side.each(n, target, solve, pairs_on_cpu(task, a.device)):
        clipped += rot.clipped_planes
        if rot.clipped_planes:
            log_clipped(task, i, rot.clipped_planes, params)
        if rot.frame is not None and rot.frame.shape[1] > 0:
            acc.add(rot.q_w, task.weights[i], rot.frame)
        else:
            acc.add(rot.dense_q(), task.weights[i])
        if running:
            # τ of the pseudo-expert W₀ + ρ_i, in the same operations as _Residuals + task arithmetic
            term = task.experts[i].sub_(rotate_base(a, basis, rot).sub_(a)).sub_(a)
            if residual_sum is None:
                residual_sum = torch.zeros_like(a)
            residual_sum.add_(term, alpha=task.weights[i])
            del term
        elif params.rotation_merge in ("average_r", "product_r") or rotation_bytes(rot) <= a.numel() * a.element_size():
            rotations.append(rot if task.state_device is None else rot.to(task.state_device))
        else:  # keep what the residual pass reads, W₀R_iᵀ − W₀, not the larger frame and w×w factors
            moved = rotate_base(a, basis, rot).sub_(a)
            rotations.append(moved if task.state_device is None else moved.to(task.state_device))
    dense = (
        [r.to(basis.p.device).dense_r() for r in rotations]
        if params.rotation_merge in ("average_r", "product_r")
        else []
    )
    note_rotation(
        task, params, acc, clipped, conflict_fraction, basis.p.shape[1]
    )  # before merged_rotation consumes acc
    r_star = merged_rotation(acc, dense, task.weights, params)
    del acc
    if running:
        assert residual_sum is not None
        merged_residual = a + residual_sum.mul_(res_params.lambda_)
    else:
        merged_residual = res_method.merge(
            TensorTask(task.name, a, _Residuals(task, basis, rotations), task.weights, task.densities, None, task.seed),
            res_params,
        )
    rotated = rotate_base(a, basis, r_star)
    residual = merged_residual.sub_(a)
    if task.diagnostics is not None:  # the share of the update the rotation carries (the paper's Figure 4)
        r_norm, s_norm = float((rotated - a).norm()), float(residual.norm())
        task.note("rotation_share", r_norm / (r_norm + s_norm) if r_norm + s_norm else 0.0)
    return rotated.add_(residual)


def note_rotation(
    task: TensorTask,
    params: OrthoMergeParams,
    acc: LieAccumulator,
    clipped: int,
    conflict_fraction: dict[int, float],
    dim: int,
) -> None:
    """What explains one rotated tensor, for `streammerge report`."""
    if task.diagnostics is None:
        return
    task.note("generator_norms", list(acc.norms))
    task.note(
        "merged_generator_norm",
        acc.magnitude(params.magnitude) * params.scale if params.rotation_merge == "magnitude_corrected" else None,
    )
    total = sum(w * q for w, q in zip(acc.weights, acc.norms))
    if acc.total is not None and params.direction == "sum" and total:  # 1: the experts rotate alike; 1/√N: orthogonally
        task.note("generator_agreement", float(torch.linalg.vector_norm(acc.total)) / total)
    task.note("planes_reset", clipped)
    task.note("rotation_subspace_dim", dim)
    if conflict_fraction:
        task.note("conflict_row_fraction", [conflict_fraction.get(i, 0.0) for i in range(len(task.weights))])


def merged_generator(
    gens, weights: tuple[float, ...], params: OrthoMergeParams, dtype: torch.dtype, device
) -> torch.Tensor:
    """Q* blocks [r, b, b] from the experts' stored generators (a missing one counts as zero)."""
    if params.rotation_merge not in ("magnitude_corrected", "average_q"):
        raise ValueError(f"rotation_merge {params.rotation_merge!r} has no generator; it needs dense output")
    acc = LieAccumulator(params.direction)
    shape = (gens.module.blocks, gens.module.block_size, gens.module.block_size)
    for i in range(len(gens)):
        q = gens[i]
        acc.add(torch.zeros(shape, dtype=dtype, device=device) if q is None else q, weights[i])
    if params.rotation_merge == "average_q":
        return acc.simple_average(params.scale)
    return acc.magnitude_corrected(params.magnitude, params.scale)


def merge_oft(task: TensorTask, params: OrthoMergeParams) -> torch.Tensor:
    """OFT experts (section 3.2): merge the stored generators directly, per block-diagonal
    matrix, and map back with the adapters' own convention (PEFT's sign and Cayley flag)."""
    from ..io.peft_oft import apply_rotation

    gens = task.generators
    if gens.module is None:  # no expert adapts this tensor
        return task.base.clone()
    dtype, device = task.base.dtype, task.base.device
    if params.rotation_merge in ("average_r", "product_r"):
        shape = (gens.module.blocks, gens.module.block_size, gens.module.block_size)
        rotations = [
            gens.convention.rotation(torch.zeros(shape, dtype=dtype, device=device) if gens[i] is None else gens[i])
            for i in range(len(gens))
        ]
        r_blocks = merged_rotation(LieAccumulator(), rotations, task.weights, params)
    else:
        q_star = merged_generator(gens, task.weights, params, dtype, device)
        r_blocks = gens.convention.rotation(q_star)
        task.note("merged_generator_norm", float(torch.linalg.vector_norm(q_star)))
    note_oft_rotation(task, r_blocks)
    row_scale = None
    if gens.convention.fmt == "full_scaled":
        # PEFT 0.14–0.15 also scales output rows (oft_s): not a rotation; averaged (weighted).
        ones = torch.ones(task.base.shape[0], 1, dtype=dtype, device=device)
        scales = [gens.row_scale(i) for i in range(len(gens))]
        row_scale = sum(w * (ones if s is None else s) for w, s in zip(task.weights, scales)) / sum(task.weights)
    return apply_rotation(task.base, r_blocks, gens.module, gens.convention, row_scale)


def note_oft_rotation(task: TensorTask, r_blocks: torch.Tensor) -> None:
    """How far the merged rotation moves from the identity, beside each expert's (Frobenius norms
    over the blocks, for `streammerge report`): ‖R* − I‖ near 0 while the experts' are not means
    the merge cancelled their rotations."""
    if task.diagnostics is None:
        return
    gens = task.generators
    eye = torch.eye(r_blocks.shape[-1], dtype=r_blocks.dtype, device=r_blocks.device)
    stored = [gens[i] for i in range(len(gens))]
    task.note("rotation_distance", float(torch.linalg.vector_norm(r_blocks - eye)))
    task.note("generator_norms", [0.0 if q is None else float(torch.linalg.vector_norm(q)) for q in stored])
    task.note(
        "expert_rotation_distances",
        [0.0 if q is None else float(torch.linalg.vector_norm(gens.convention.rotation(q) - eye)) for q in stored],
    )


def merged_rotation(
    acc: LieAccumulator, rotations: list[torch.Tensor], weights: tuple[float, ...], params: OrthoMergeParams
) -> torch.Tensor:
    """R*_s in the base subspace, by the chosen rule."""
    if params.rotation_merge in ("magnitude_corrected", "average_q"):
        q = (
            acc.magnitude_corrected(params.magnitude, params.scale)
            if params.rotation_merge == "magnitude_corrected"
            else acc.simple_average(params.scale)
        )
        acc.total = acc.plain_total = None  # q is a fresh tensor: the k×k sums can go
        return cayley(q) if q.dim() != 2 else cayley_consuming(q)
    if params.rotation_merge == "average_r":
        total = sum(w * r for w, r in zip(weights, rotations))
        return total / sum(weights)
    product = torch.eye(rotations[0].shape[-1], dtype=rotations[0].dtype, device=rotations[0].device).expand_as(
        rotations[0]
    )
    for r in rotations:  # R_N ··· R_1: expert 1 acts first (batched over OFT blocks)
        product = r @ product
    return product


def conflict_statistics_tensors(name: str, shape: tuple[int, ...], params: OrthoMergeParams) -> bool:
    """The weights whose working set depends on the data: wide ones (out < in) rotated with the
    conflict target, where k = dim S grows with the conflicting rows (square and tall: k = in)."""
    return params.target == "conflict" and len(shape) == 2 and 0 < shape[0] < shape[1] and rotates(name, shape, params)


def _count_conflicts(blocks) -> dict[str, dict[str, list]]:
    """Per tensor: each expert's conflicting rows (row-local, so counted block by block) and its
    LoRA rank (None: dense), which bounds what its target adds to S."""
    found: dict[str, dict[str, list]] = {}
    for name, base, experts in blocks:
        n = len(experts)
        if name not in found:
            get = getattr(experts, "factors", None)
            factors = [get(i) if get is not None else None for i in range(n)]
            found[name] = {"conflicts": [0] * n, "ranks": [None if f is None else int(f[1].shape[0]) for f in factors]}
        for i, rows in enumerate(conflicts_among([experts[i].sub_(base) for i in range(n)])):
            found[name]["conflicts"][i] += int(rows.sum())
    return found


def statistics(
    map_pass, n_experts: int, params: OrthoMergeParams, model_values=None
) -> dict[str, dict[str, list]] | None:
    """The conflicting rows of every wide weight, for a tight plan (Method.plan_statistics)."""
    if params.target != "conflict":
        return None
    merged: dict[str, dict[str, list]] = {}
    for part in map_pass(_count_conflicts):
        for name, found in part.items():
            if name in merged:  # a tensor cut across parts: integer sums
                merged[name]["conflicts"] = [a + b for a, b in zip(merged[name]["conflicts"], found["conflicts"])]
            else:
                merged[name] = found
    return merged


def measured_subspace(shape: tuple[int, ...], found: dict[str, list]) -> int:
    """k = dim S given the conflicting rows: the base's rows plus, per expert with any, its
    conflicting rows (dense) or the rows of its A factor (LoRA: SubspaceBuilder adds those)."""
    out, inn = shape
    added = sum(0 if c == 0 else (c if r is None else r) for c, r in zip(found["conflicts"], found["ranks"]))
    return min(inn, min(out, inn) + added)


# Peak-memory coefficients, fitted to measured peaks (bench/results/memory-plan-vs-measured.md).
_C_COMPUTE, _C_OUT_IN, _C_SIDES, _C_SQUARE = 4.0, 0.5, 1.0, 14.0
_C_ACC, _C_FRAME = 5.0, 10.0  # wide layers: k×k sum, Cayley and rotation; w×w frame solves
# tall layers in row blocks: block temporaries; k×k solves (two fewer for the conflict target,
# whose smaller rotations rarely need the angle reset's eigh and polar)
_C_TALL_BLOCKS, _C_TALL_SQUARE = 5.0, 9.0
# the second of two solves side by side (Need.side_by_side), fitted to the peaks measured with one
# thread and with two (bench/results/README.md, "Round fifteen"): k×k solves; frame and w×w
# solves; a tall weight's in×in solves
_C_PAIR_SQUARE, _C_PAIR_FRAME_K, _C_PAIR_FRAME, _C_PAIR_TALL = 5.0, 2.0, 6.0, 11.0


def memory(
    name: str, shape: tuple[int, ...], n: int, params: OrthoMergeParams, itemsize: int, statistics: dict | None = None
):
    """Peak bytes of one weight. k = dim S = min(in, min(out, in) + N·out) for full-rank updates
    (exact for the global target, an upper bound for the conflict target, where only conflicting
    rows add directions: given `statistics`, this tensor's conflicting rows, k is that count's
    bound instead, measured_subspace). Three regimes, as `merge` takes them:
    * tall, bigger than a row block: row blocks; held are the merged residual (compute dtype,
      in host memory on any device), the residual method's own working set, in×in matrices (Gram, P,
      the N cross products then rotations, the solves) and a few blocks;
    * wide (2·out ≤ k: down_proj, GQA k/v): the weight's compute and `precision` copies, the
      out×k and in×k factors, the k×k generator sum and merged rotation, w×w frame solves
      (w = 2·out); the residual is a running sum (task arithmetic) or the N rotations are state;
    * otherwise: whole, with k×k solves, the N rotations as state unless the residual is a sum."""
    from .base import BLOCK_ELEMENTS

    res_method, res_params = residual_method(params, max(n, 1))
    if not rotates(name, shape, params):
        return res_method.memory(name, shape, n, res_params, itemsize)
    out, inn = shape
    f = 8 if linalg_dtype(params, shape, n) == torch.float64 else 4
    numel = out * inn
    running = res_method.name == "task_arithmetic" and params.rotation_merge not in ("average_r", "product_r")
    if statistics is not None and params.target == "conflict" and not any(statistics["conflicts"]):
        # no row conflicts: every target is the base, and `merge` runs the residual merge alone
        # after finding that out with the base, τ_mean, one τ_i and the row cosines' temporaries
        residual = res_method.memory(name, shape, n, res_params, itemsize)
        return dataclasses.replace(residual, work=residual.work + 5 * numel * itemsize)
    if lean_wide(shape, n, params):
        return lean_wide_memory(shape, n, params, itemsize, f, running, statistics)
    if out >= inn and numel > BLOCK_ELEMENTS:
        block = BLOCK_ELEMENTS
        residual = res_method.memory(name, shape, n, res_params, itemsize)
        work = (
            residual.work
            + residual.state
            + _C_TALL_BLOCKS * block * max(f, itemsize)
            + (_C_TALL_SQUARE - (2 if params.target == "conflict" else 0) + n) * inn * inn * f
            + n * out
        )
        # the merged residual is gathered in host memory on any device (new_output): on CUDA it
        # is host RAM, not GPU memory (2.1 GB for an 8B embedding: the H100 run's excess, gpu.md)
        # a second in×in solve side by side (the conflict target's, as above, rarely resets angles)
        second = (_C_PAIR_TALL - (3 if params.target == "conflict" else 0)) * inn * inn * f if n >= 2 else 0
        return Need(int(work), 0, transfer=block, host=numel * itemsize, side_by_side=int(second))
    k = (
        subspace_bound(shape, n)
        if statistics is None
        else min(subspace_bound(shape, n), measured_subspace(shape, statistics))
    )
    base = _C_COMPUTE * numel * itemsize + _C_OUT_IN * numel * f + _C_SIDES * (out + inn) * k * f
    ablation = params.rotation_merge in ("average_r", "product_r")  # these keep every R_i
    # a second expert's target and Procrustes solve, held while the first is solved (math/side_by_side.py)
    second = numel * (itemsize + f) if n >= 2 else 0
    if 2 * out <= k:
        w = 2 * out
        per_expert = (k * w + 2 * w * w) * f if ablation else min((k * w + 2 * w * w) * f, numel * itemsize)
        if second:
            second += (2 * out * k + _C_PAIR_FRAME_K * k * w + _C_PAIR_FRAME * w * w) * f
        work = base + _C_ACC * k * k * f + _C_FRAME * w * w * f
        return Need(int(work), 0 if running else int(n * per_expert), side_by_side=int(second))
    per_expert = 2 * k * k * f if ablation else min(2 * k * k * f, numel * itemsize)
    if second:
        second += (out * k + _C_PAIR_SQUARE * k * k) * f
    return Need(int(base + _C_SQUARE * k * k * f), 0 if running else int(n * per_expert), side_by_side=int(second))


# OFT experts' generators (merge_oft): weight-sized buffers (the base in the compute dtype, the
# einsum's copy and result: about 1.9, from the peaks measured on an 8192×4096 weight, three and five experts, blocks of
# 16–128; tests/test_plan_budget.py) and generator-sized ones (sums, the Cayley map's solve)
_C_OFT_WEIGHT, _C_OFT_BLOCKS = 2.5, 8.0


def generators_memory(name: str, shape: tuple[int, ...], n: int, params: OrthoMergeParams, itemsize: int, gens):
    """merge_oft's peak: weight-sized buffers (one more for PEFT 0.14–0.15's row scales), the
    generators' r·b² elements a few times over and once per expert (all kept under --report and the
    R-averaging ablations), and PEFT ≤ 0.13's output-side rotation as one (r·b)² matrix."""
    if not rotates(name, shape, params):
        return memory(name, shape, n, params, itemsize)
    numel = math.prod(shape)
    module = gens.module
    if module is None:  # no expert adapts it: the base, copied
        return Need(2 * numel * itemsize)
    blocks = module.blocks * module.block_size**2
    weight = _C_OFT_WEIGHT + (gens.convention.fmt == "full_scaled")
    work = weight * numel * itemsize + (n + _C_OFT_BLOCKS) * blocks * itemsize
    if gens.convention.fmt == "output_side":
        work += (module.blocks * module.block_size) ** 2 * itemsize
    return Need(int(work))


def generators_cost(name: str, shape: tuple[int, ...], n: int, params: OrthoMergeParams, gens) -> Cost:
    """merge_oft's work: the blocks' products with the weight and the b×b Cayley solves."""
    if gens.module is None or not rotates(name, shape, params):
        return Cost()
    b, blocks = gens.module.block_size, gens.module.blocks
    return Cost(flops=2.0 * math.prod(shape) * b + 2.0 * (n + 4) * blocks * b**3, factorisation=blocks * b**3)


# The lean wide path's peak (_merge_wide_lean), fitted to measured peaks
# (bench/results/wide-memory-*.md): weight-sized buffers (base, target, running residual, moved
# base, expert); per-expert frame buffers [k, 2·out]; frame solves [2·out, 2·out].
_C_LEAN_WEIGHT, _C_LEAN_FRAME, _C_LEAN_SOLVE = 4.0, 1.5, 5.0
# On CUDA the same path peaked 1.20× that (a 70B down_proj, five experts, H200: 24.6 GB against
# 20.4 GB; bench/results/gpu-check-h200.json, step 3b): torch's CUDA QR and LU copy what the
# CPU's factor in place. One shape measured; planned with a margin.
_C_LEAN_CUDA = 1.25


def lean_wide_memory(
    shape: tuple[int, ...], n: int, params: OrthoMergeParams, itemsize: int, f: int, running: bool, statistics
) -> Need:
    """Held: the subspace buffer [in, k] (k: the bound, or with statistics the measured count),
    Σ w_i Q_i [k, k] (two with direction "uniform"),
    A P and Q_y [out, k], τ_mean (conflict), weight-sized buffers; per expert the frame and its
    solves (when 2·out ≤ k); the N moved bases as state unless the residual is a running sum."""
    out, inn = shape
    numel = out * inn
    bound = subspace_bound(shape, n)
    k = bound if statistics is None else min(bound, measured_subspace(shape, statistics))
    sums = 2 if params.direction == "uniform" else 1
    held = inn * k * f + sums * k * k * f + 2 * out * k * f + _C_LEAN_WEIGHT * numel * max(f, itemsize)
    if params.target == "conflict":
        held += numel * itemsize
    w = 2 * out
    solve = _C_LEAN_FRAME * k * w * f + _C_LEAN_SOLVE * w * w * f if w <= k else 2 * k * k * f
    if not running:  # the residual method's merge comes after the last frame solve
        res_method, res_params = residual_method(params, n)
        solve = max(solve, res_method.memory("", shape, n, res_params, itemsize).work)
    work = int(held + solve)
    return Need(work, 0 if running else int(n * numel * itemsize), gpu_work=int(_C_LEAN_CUDA * work))


METHOD = Method(
    "orthomerge",
    OrthoMergeParams,
    merge,
    memory=memory,
    statistics=statistics,
    statistics_passes=lambda p: 1 if p.target == "conflict" else 0,
    plan_statistics=True,
    statistics_tensors=conflict_statistics_tensors,
    for_device=auto_precision_on_gpu,
    merges_generators=True,
    generators_memory=generators_memory,
    generators_cost=generators_cost,
    doc=__doc__ or "",
    expert_params={"weight": 1.0, "density": None},  # density: the residual method's (ties, dare)
    check_experts=check_experts,
    cost=cost,
    param_hints={"lambda_": "the residual's λ is --residual-param lambda=..."},
)
