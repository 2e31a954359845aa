"""gta: generalised task arithmetic with mergekit 0.1.5's semantics — sparsify each task vector,
weight it, optionally elect a sign, sum, optionally normalise, scale by λ.

mergekit recipes for task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della and della_linear run here (mergekit_recipe.py maps each name onto these
parameters with mergekit's defaults), so a mergekit recipe means what it means there. Per
expert i and tensor (settings.py resolves gradients and filters):

    τ̂_i = sparsify(W_i − W_0; density_i, gamma_i, epsilon_i), then × ‖τ_i‖₁/‖τ̂_i‖₁ if `rescale`
          (the norms exact sums rounded once to float64, math/exact_sum.py; the ratio in float32)
    v_i = w_i τ̂_i
    consensus none:  m = Σ v_i,            d = Σ w_i             (|d| < 1e-8 → 1)
    consensus sum:   s = +1 where Σ v_i ≥ 0 else −1 (count: Σ sign v_i), a_i = [sign v_i = s]
                     m = Σ a_i v_i,        d = Σ a_i w_i         (d = 0 → 1)
    W = W_0 + λ · (m / d if normalize else m)

Sparsifiers (density ≥ 1 keeps τ unchanged, without rescaling):
- magnitude: the k = max(1, ⌊density·n⌋) largest |τ|, exactly k;
- magnitude_outliers (breadcrumbs): drop the ⌊gamma·n⌋ largest, keep the next ⌊density·n⌋;
  for both, which of the entries tied at a threshold are kept: `tie_break: index` (the
  default) keeps the earliest in row-major order, without a sort, the same on every machine and
  device and whether the tensor is merged whole or in row blocks. mergekit keeps whatever
  torch's unstable sort of the whole |τ| leaves first, and that depends on the machine: on one
  CPU and one torch, mergekit's own TIES output differs in 0.5 % of its entries between torch's
  AVX2 and plain kernels (bench/results/tie-order.md), so its order is not a contract.
  `tie_break: mergekit` makes that same sort here (where ties straddle the threshold; it costs
  what mergekit's does) and so matches mergekit run on the same machine, for whole tensors
  (a tensor streamed in row blocks keeps the earliest);
- random (DARE): keep each entry with probability density;
- della_magprune: keep with probability density − ε + 2ε·r, r the entry's magnitude rank in
  its row scaled to [0, 1].
The random masks come from our generator seeded by (seed, tensor, expert): reproducible, but
not mergekit's draws (it uses torch's global generator), so random methods agree with mergekit
in distribution, not entry by entry.

Streaming: as TIES (ties.py): the N sparsified vectors are kept whole when they fit
`ties.CACHE_BYTES`; larger tensors go in row blocks, each expert observed in as many passes as its
sparsifier needs (thresholds, then L1 norms) and then sparsified block by block in the same
order (tie counters and random generators run on across blocks), so results do not depend on
the block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..math import fused, torch_rand
from ..math.exact_sum import L1Norm
from ..math.torch_rand import TorchRand
from ..plan import Need
from .base import check_choice, REQUIRED, Method, Rows, TensorTask, map_row_blocks
from . import ties
from .ties import RadixSelect, _bits_of, magnitude_bits

SPARSIFIERS = ("none", "magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_EPS = 1e-7  # mergekit: no rescaling where either L1 norm is below this


@dataclass(frozen=True)
class GtaParams:
    sparsify: str = "none"
    consensus: str = "none"  # "none", "sum" (TIES) or "count"
    normalize: bool = False
    rescale: bool = False  # restore each sparsified vector's L1 norm (mergekit's `rescale`)
    lambda_: float = 1.0  # any real number: negative values subtract (task negation)
    int8_mask: bool = False  # mergekit's mask storage; no effect on the result
    tie_break: str = "index"  # among magnitudes tied at a threshold: "index" (earliest) or "mergekit" (its sort)

    def __post_init__(self) -> None:
        check_choice("tie_break", self.tie_break, ("mergekit", "index"))
        check_choice("sparsify", self.sparsify, SPARSIFIERS)
        check_choice("consensus", self.consensus, ("none", "sum", "count"))
        if not math.isfinite(self.lambda_):
            raise ValueError(f"lambda = {self.lambda_} is not finite")


class Sparsifier:
    """One expert's sparsification of one tensor, fed its task vector in row-major blocks:
    `begin(stage)` and `observe(stage, block)` for stage in range(passes) (each a full pass),
    then `ready()` and `apply(block)` in the same order."""

    def __init__(self, kind: str, values: dict, rescale: bool, shape: tuple[int, ...], rng_factory):
        self.density = float(values.get("density", 1.0))
        self.kind = "none" if self.density >= 1 else kind
        self.rescale = rescale and self.kind != "none"
        self.shape, self.numel = shape, math.prod(shape)
        self.rng_factory = rng_factory
        self.before = L1Norm()  # ‖τ‖₁ and ‖τ̂‖₁
        self.after = L1Norm()
        self.selects: list[RadixSelect] = []
        n = self.numel
        if self.kind == "magnitude":
            self.k = max(1, int(self.density * n))
            self.selects = [RadixSelect(self.k)]
        elif self.kind == "magnitude_outliers":
            target = int(self.density * n)
            top = int(float(values.get("gamma", 0.01)) * n)
            self.window = (max(0, n - target - top), max(0, n - target - top) + target)  # ascending ranks kept
            if target > 0:
                self.selects = [RadixSelect(n - self.window[0]), RadixSelect(n - self.window[1] + 1)]
        elif self.kind == "della_magprune":
            eps = float(values.get("epsilon", 0.15))
            if self.density + eps >= 1 or self.density - eps <= 0:
                raise ValueError(f"epsilon = {eps} with density = {self.density}: density ± epsilon must lie in (0, 1)")
            self.eps = eps
        self.stages = (["high", "low"] if self.selects else []) + (["norms"] if self.rescale else [])
        self.passes = len(self.stages)
        self.bounds: list[tuple[int, int, int]] | None = None
        self.whole_tensor = False  # set by `whole`: ties at a threshold may then follow mergekit's sort
        self.ties_seen = [0] * len(self.selects)
        self.rng = self._generator()

    def _generator(self) -> torch.Generator | TorchRand | None:
        """A fresh generator for the random masks: torch's draws, made in numba where it can
        (math/torch_rand.py; the same numbers, so the same masks)."""
        if self.kind not in ("random", "della_magprune"):
            return None
        g = self.rng_factory()
        return torch_rand.stream(g, self.numel) or g

    def begin(self, stage: int) -> None:
        """Before pass `stage` over the blocks."""
        if self.stages[stage] == "norms":
            self.ready()

    def observe(self, stage: int, tau: torch.Tensor, bits: torch.Tensor | None = None) -> None:
        """`bits`: τ's magnitude_bits if the caller has them (a whole tensor: computed once)."""
        what = self.stages[stage]
        if what == "norms":  # with the mask `apply` will draw
            self.before.add(tau)
            self.after.add(self._masked(tau.clone(), bits))
            return
        if bits is None and fused.available(tau):
            for s in self.selects:
                s.add_high_values(tau) if what == "high" else s.add_low_values(tau)
            return
        if bits is None:
            bits = magnitude_bits(tau)
        for s in self.selects:
            s.add_high(bits) if what == "high" else s.add_low(bits)

    def ready(self) -> None:
        """After the observation passes (or between them, for the norms): thresholds known,
        tie counters and generator restarted, so the next pass repeats the same mask."""
        if self.selects and self.bounds is None:
            self.bounds = [(_bits_of(s.value()), s.above, s.equal) for s in self.selects]
        self.ties_seen = [0] * len(self.selects)
        self.rng = self._generator()

    def _keep_ties(self, keep: torch.Tensor, eq: torch.Tensor, j: int, lo: int, hi: int) -> None:
        """Set `keep` on the ties of bound j whose index among all of its ties (row-major, counted
        across blocks) lies in [lo, hi)."""
        idx = eq.reshape(-1).nonzero().squeeze(1)
        seen = self.ties_seen[j]
        self.ties_seen[j] += idx.numel()
        chosen = idx[max(0, lo - seen) : max(0, hi - seen)]
        if chosen.numel():
            keep.view(-1)[chosen] = True

    def _masked(self, tau: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "none":
            return tau
        if self.kind == "magnitude":
            vb, above, equal = self.bounds[0]
            if self.whole_tensor and above < self.k < above + equal:
                order = torch.argsort(tau.abs().reshape(-1).float(), descending=True)[
                    : self.k
                ]  # mergekit's call, its tie order
                return tau.mul_(
                    torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
                    .index_fill_(0, order, 1)
                    .view(tau.shape)
                )
            if bits is None and fused.finite_bound(vb) and fused.available(tau):
                self.ties_seen[0] += fused.mask_magnitude(tau, vb, 0, self.k - above, self.ties_seen[0], 1.0)
                return tau
            bits = (magnitude_bits(tau) if bits is None else bits).view(tau.shape)
            keep = bits > vb
            self._keep_ties(keep, bits == vb, 0, 0, self.k - above)
        elif self.kind == "magnitude_outliers":
            if not self.selects:
                return tau.zero_()
            lo, hi = self.window
            if self.whole_tensor and any(
                self.numel - a - e < r < self.numel - a for (_, a, e), r in zip(self.bounds, (lo, hi))
            ):
                order = torch.sort(tau.abs().reshape(-1).float(), descending=False).indices[
                    lo:hi
                ]  # mergekit's call, its tie order
                return tau.mul_(
                    torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
                    .index_fill_(0, order, 1)
                    .view(tau.shape)
                )
            bits = magnitude_bits(tau).view(tau.shape)
            (b_lo, above_lo, eq_lo), (b_hi, above_hi, eq_hi) = self.bounds
            keep = (bits > b_lo) & (bits < b_hi)
            less = self.numel - above_lo - eq_lo  # tie p of value v has ascending rank less(v) + p
            self._keep_ties(keep, bits == b_lo, 0, lo - less, hi - less)
            if b_hi != b_lo:
                less = self.numel - above_hi - eq_hi
                self._keep_ties(keep, bits == b_hi, 1, lo - less, hi - less)
        elif self.kind == "random":
            if isinstance(self.rng, TorchRand):
                return self.rng.keep(tau, self.density)
            keep = torch.rand(tau.shape, generator=self.rng, dtype=torch.float32).to(tau.device) < self.density
        else:  # della_magprune: per-row magnitude ranks (1-D tensors: one row)
            rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
            span = max(rows.shape[1] - 1, 1)
            # the keep probability of rank r, the same float32 operations as on a tensor of ranks
            by_rank = torch.arange(rows.shape[1], device=rows.device).to(torch.float32)
            by_rank = (self.density - self.eps) + by_rank.div_(span).clamp_(0, 1).mul_(2 * self.eps)
            if isinstance(self.rng, TorchRand):
                draws = self.rng.rand(rows.shape)
            else:
                draws = torch.rand(rows.shape, generator=self.rng, dtype=torch.float32)
            if rows.dim() == 2 and fused.available(rows):
                fused.della_keep(rows, draws, by_rank)  # the ranks without a sort (several times faster)
                return tau
            order = torch.argsort(rows.abs(), dim=1, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order).contiguous())
            keep = (draws.to(tau.device) < by_rank[ranks]).view(tau.shape)
        return tau.mul_(keep)

    def apply(self, tau: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
        """τ̂ of the next block (in place)."""
        return self.rescaled(self._masked(tau, bits))

    def rescaled(self, masked: torch.Tensor) -> torch.Tensor:
        """The masked block times ‖τ‖₁/‖τ̂‖₁ where `rescale` asks for it (in place)."""
        ratio = self.ratio()
        return masked if ratio is None else masked.mul_(ratio.to(masked.dtype))

    def ratio(self) -> torch.Tensor | None:
        """‖τ‖₁/‖τ̂‖₁ in float32 where `rescale` asks for it and both norms are at least RESCALE_EPS."""
        if not self.rescale:
            return None
        before, after = self.before.value(), self.after.value()
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            return torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32)
        return None


def sparsifiers(task: TensorTask, params: GtaParams) -> list[Sparsifier]:
    return [
        Sparsifier(params.sparsify, task.expert_values[i], params.rescale, task.shape, lambda i=i: task.rng(i))
        for i in range(len(task.weights))
    ]


def whole(sp: Sparsifier, tau: torch.Tensor, mergekit_ties: bool = True) -> torch.Tensor:
    """τ̂ of a tensor held in memory: every observation pass over it, then apply."""
    # |τ|'s bit patterns once, for the thresholds and the mask (the fused kernels read τ itself)
    bits = magnitude_bits(tau) if sp.selects and not fused.available(tau) else None
    if sp.stages == ["norms"]:  # random masks rescaled: draw the mask once, not once per pass
        sp.begin(0)  # a fresh generator: the draws `observe` and then `apply` would make
        sp.before.add(tau)
        masked = sp._masked(tau)
        sp.after.add(masked)
        return sp.rescaled(masked)
    for stage in range(sp.passes):
        sp.begin(stage)
        sp.observe(stage, tau, bits)
    sp.ready()
    sp.whole_tensor = mergekit_ties
    return sp.apply(tau, bits)


def combine(
    vectors: list[torch.Tensor], weights: tuple[float, ...], base: torch.Tensor, params: GtaParams
) -> torch.Tensor:
    """W_0 + λ·(normalised) Σ of the weighted vectors v_i, with the consensus mask if any."""
    if fused.available(base, *vectors):
        return fused.combine(vectors, weights, base, params.consensus, params.normalize, params.lambda_)
    mixed = torch.zeros_like(base)
    if params.consensus == "none":
        for v in vectors:
            mixed.add_(v)
        divisor: torch.Tensor | float = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    else:
        for v in vectors:
            mixed.add_(v if params.consensus == "sum" else torch.sign(v))
        majority = torch.where(mixed >= 0, 1.0, -1.0).to(base.dtype)
        mixed.zero_()
        divisor = torch.zeros_like(base)
        for v, w in zip(vectors, weights):
            agree = torch.sign(v) == majority
            mixed.add_(v * agree)
            divisor.add_(agree.to(base.dtype), alpha=w)
        divisor.masked_fill_(divisor == 0, 1.0)
    if params.normalize:
        mixed.div_(divisor)
    if params.lambda_ != 1:
        mixed.mul_(params.lambda_)
    return mixed.add_(base)


def combine_stored(task: TensorTask, rows: Rows | None, params: GtaParams) -> torch.Tensor:
    """combine of the unsparsified task vectors of rows `rows`, read as stored: bf16 inputs go to
    the fused kernel, which widens them as it reads; others are widened here, as task_vector does."""
    base = task.stored(None, rows)
    experts = [task.stored(i, rows) for i in range(len(task.weights))]
    if task.dtype == torch.float32 and fused.available(base, *experts, dtype=torch.bfloat16):
        return fused.combine_bf16(experts, task.weights, base, params.consensus, params.normalize, params.lambda_,
                                  task.store_into(rows))  # fmt: skip
    wide = base.to(task.dtype)
    # copy=True: a stored tensor may be the input file's mapped bytes, never to be written
    vectors = [e.to(task.dtype, copy=True).sub_(wide).mul_(w) for e, w in zip(experts, task.weights)]
    del experts
    return combine(vectors, task.weights, wide, params)


NEVER = 1 << 32  # above every magnitude's bit pattern: a bound no entry reaches


def magnitude_stored(task: TensorTask, sps: list[Sparsifier], params: GtaParams) -> torch.Tensor | None:
    """TIES, breadcrumbs and their like (magnitude sparsifiers, earliest ties kept, no rescaling)
    of bf16 inputs read as stored, in fused passes (math/fused.py MagnitudeStored): the thresholds
    from histogram passes over the inputs (count_thresholds), then one pass that masks, weights
    and combines. The bytes of the code below, which forms every τ_i in float32 and passes over it
    four times more (tests/test_fused.py). None where it does not apply (then that code runs)."""
    if (
        params.tie_break != "index"
        or any(sp.kind not in ("none", "magnitude", "magnitude_outliers") or sp.rescale for sp in sps)
        or any(sp.kind == "magnitude_outliers" and not sp.selects for sp in sps)  # all zeroed: +0, not ±0
    ):
        return None
    inputs = ties.stored_bf16(task)
    if inputs is None:
        return None
    blocks = task.row_blocks()
    counts = fused.MagnitudeStored.for_experts(len(sps))
    numel = math.prod(task.shape)
    ties.count_thresholds(counts, inputs, blocks, [sp.selects for sp in sps], numel, captures(params, len(sps), numel))
    bounds, windows, equals = [], [], []
    for sp in sps:
        sp.ready()
        if sp.kind == "none":
            bounds.append((-1, NEVER))
            windows.append(((0, 0), (0, 0)))
            equals.append((0, 0))
        elif sp.kind == "magnitude":  # as Sparsifier._masked: above the bound, and its first k − above ties
            vb, above, equal = sp.bounds[0]
            bounds.append((vb, NEVER))
            windows.append(((0, sp.k - above), (0, 0)))
            equals.append((equal, 0))
        else:  # magnitude_outliers: strictly between, and the ties at each bound in the window
            (b_lo, above_lo, eq_lo), (b_hi, above_hi, eq_hi) = sp.bounds
            lo, hi = sp.window
            less_lo, less_hi = sp.numel - above_lo - eq_lo, sp.numel - above_hi - eq_hi
            bounds.append((b_lo, b_hi))
            at_hi = (lo - less_hi, hi - less_hi) if b_hi != b_lo else (0, 0)
            windows.append(((lo - less_lo, hi - less_lo), at_hi))
            equals.append((eq_lo, eq_hi if b_hi != b_lo else 0))
    seen = [[0, 0] for _ in sps]

    def block(rows: Rows | None) -> torch.Tensor:
        base, experts = inputs(rows)
        return counts.combine(experts, base, bounds, windows, equals, seen, task.weights, params.consensus,
                              params.normalize, params.lambda_, task.store_into(rows), rows)  # fmt: skip

    try:
        return map_row_blocks(task, block)
    finally:
        counts.captured.clear()


def captures(params: GtaParams, n_experts: int, numel: int) -> bool:
    """Whether magnitude_stored's spanned pass keeps where its bins' entries lie, so that the combine
    counts its ties from there (fused.MagnitudeStored.captured_ties): TIES's one threshold, within
    fused.CAPTURE_BYTES; not breadcrumbs, whose top bound lies far from the span, so that a pass
    counts its ties anyway (measured: no gain; bench/results/README.md, "Round ten")."""
    return params.sparsify == "magnitude" and fused.capture_bytes(n_experts, numel) > 0


def random_stored(task: TensorTask, sps: list[Sparsifier]) -> Callable[[GtaParams], torch.Tensor] | None:
    """DARE and its like (random sparsifiers, rescaled or not) of bf16 inputs read as stored: a pass
    that draws each expert's mask as bits (math/torch_rand.py: torch's draws) and sums the norms
    of τ_i and τ̂_i from the inputs (math/exact_sum.py), then one pass that masks, rescales,
    weights and combines. The bytes of the code in `merge`, which forms every τ_i in float32,
    keeps them, and passes over them four times more (tests/test_fused.py). Returns the merge
    to run, or None where this does not apply (then that code runs); the sparsifiers must be
    fresh."""
    if not any(sp.kind == "random" for sp in sps) or any(sp.kind not in ("none", "random") for sp in sps):
        return None
    if any(not isinstance(sp.rng, TorchRand) for sp in sps if sp.kind == "random"):
        return None
    inputs = ties.stored_bf16(task)
    if inputs is None:
        return None

    def run(params: GtaParams) -> torch.Tensor:
        import numpy as np

        numel = math.prod(task.shape)
        row = numel // task.shape[0] if task.shape else 1
        drawn = [i for i, sp in enumerate(sps) if sp.kind == "random"]
        rescaled = [i for i in drawn if sps[i].rescale]
        keep = np.zeros((len(sps), (numel + 7) // 8), dtype=np.uint8)
        before = np.stack([sps[i].before.acc for i in rescaled]) if rescaled else None
        after = np.stack([sps[i].after.acc for i in rescaled]) if rescaled else None
        bit0 = 0
        for rows in task.row_blocks():
            base, experts = inputs(rows)
            torch_rand.keep_bits([sps[i].rng for i in drawn], [sps[i].density for i in drawn], keep, drawn, bit0,
                                 base.numel())  # type: ignore[misc]  # fmt: skip
            if rescaled:
                fused.random_norms_bf16(experts, base, keep, rescaled, bit0, before, after)
            bit0 += base.numel()
        for t, i in enumerate(rescaled):
            sps[i].before.acc[:], sps[i].after.acc[:] = before[t], after[t]  # type: ignore[index]
        ratios = [0.0 if (r := sp.ratio()) is None else float(r) for sp in sps]
        masked = [sp.kind == "random" for sp in sps]

        def block(rows: Rows | None) -> torch.Tensor:
            base, experts = inputs(rows)
            return fused.random_combine_bf16(experts, base, keep, 0 if rows is None else rows[0] * row, masked,
                                             ratios, task.weights, params.consensus, params.normalize,
                                             params.lambda_, task.store_into(rows))  # fmt: skip

        return map_row_blocks(task, block)

    return run


def reads_once(params: GtaParams, experts: tuple[dict, ...]) -> bool:
    """Nothing sparsified (task arithmetic and its like): `merge` takes combine_stored, one pass
    over the stored row blocks; sparsifiers make passes of their own (thresholds, norms)."""
    try:
        return params.sparsify == "none" or all(float(v.get("density", 1.0)) >= 1 for v in experts)
    except (TypeError, ValueError):
        return False  # refused when the tensor is merged (Sparsifier), with its name


def merge(task: TensorTask, params: GtaParams) -> torch.Tensor:
    n = len(task.weights)
    sps = sparsifiers(task, params)
    if task.stored is not None and all(sp.kind == "none" for sp in sps):  # task arithmetic and its like
        return map_row_blocks(task, lambda rows: combine_stored(task, rows, params))
    fast = magnitude_stored(task, sps, params)
    if fast is not None:
        return fast
    sps = sparsifiers(task, params)  # afresh: magnitude_stored may have counted into them
    if task.stored is not None and (dare := random_stored(task, sps)) is not None:
        return dare(params)
    itemsize = torch.empty((), dtype=task.dtype).element_size()
    blocks = task.row_blocks()
    if blocks == [None] or n * math.prod(task.shape) * itemsize <= ties.CACHE_BYTES:
        kept = [
            whole(sp, task.task_vector(i), params.tie_break == "mergekit").mul_(task.weights[i])
            for i, sp in enumerate(sps)
        ]

        def vectors(rows: Rows | None) -> list[torch.Tensor]:
            return kept if rows is None else [v[rows[0] : rows[1]] for v in kept]
    else:
        for stage in range(max(sp.passes for sp in sps)):
            for sp in sps:
                if stage < sp.passes:
                    sp.begin(stage)
            for rows in blocks:
                for i, sp in enumerate(sps):
                    if stage < sp.passes:
                        sp.observe(stage, task.task_vector(i, rows))
        for sp in sps:
            sp.ready()

        def vectors(rows: Rows | None) -> list[torch.Tensor]:
            return [sp.apply(task.task_vector(i, rows)).mul_(task.weights[i]) for i, sp in enumerate(sps)]

    return map_row_blocks(task, lambda rows: combine(vectors(rows), task.weights, task.base_rows(rows), params))


def memory(name: str, shape: tuple[int, ...], n: int, params: GtaParams, itemsize: int):
    """As TIES: the N vectors (whole when they fit CACHE_BYTES, else per block) plus about 7
    block-sized temporaries (masks, sign election, divisor); whole, also a sort's workspace; and
    numba's runtime where the kernels take the tensor (fused.combine, della's mask, the draws)."""
    from .base import BLOCK_ELEMENTS

    numel = math.prod(shape)
    block = min(numel, BLOCK_ELEMENTS)
    runtime = fused.runtime_bytes(numel, kernels(params, stored=False))
    if numel <= BLOCK_ELEMENTS:
        return Need(int((n + 7) * numel * itemsize) + runtime)
    if n * numel * itemsize <= ties.CACHE_BYTES:
        sort = (
            4 if params.sparsify in ("magnitude", "magnitude_outliers") and params.tie_break == "mergekit" else 0
        )  # its indices and values
        return Need(int((n + 1 + sort) * numel * itemsize + 7 * block * itemsize) + runtime)
    return Need(int((n + 8) * block * itemsize) + runtime, transfer=block)


def kernels(params: GtaParams, stored: bool) -> tuple[str, ...]:
    """The numba kernels the merge calls (fused.runtime_bytes: its plan asks numba's cache for them;
    tests/test_fused.py compares them with a merge's). Reading as stored (stored_memory's cases): one
    combine kernel with the sparsifier's passes; else the float32 combine, the sparsifier's own
    (a threshold's histogram and mask, torch's draws, della's ranks) and exact L1 norms to rescale."""
    if stored:
        if params.sparsify == "random":
            norms = ("_random_norms_bf16",) if params.rescale else ()
            return ("_mt_seed", "_mt_keep_bits_each", *norms, "_random_combine_bf16")
        if params.sparsify == "none":
            return ("_random_combine_bf16",)  # the random combine with nothing masked
        return ("_histogram_low_bf16", "_histogram_span_bf16", "_tie_counts_bf16", "_window_combine_bf16")
    own: tuple[str, ...] = {
        "none": (),
        "magnitude": ("_histogram", "_mask_magnitude"),  # tie_break mergekit: where ties do not straddle the cut
        "magnitude_outliers": ("_histogram",),
        "random": (),
        "della_magprune": ("_della_keep",),
    }[params.sparsify]
    if params.sparsify in ("random", "della_magprune") and torch_rand.available():  # else torch's own draws
        own += ("_mt_seed", "_mt_keep") if params.sparsify == "random" else ("_mt_seed", "_mt_uniform")
    rescales = params.rescale and params.sparsify != "none"
    return ("_combine", *own, *(("_exact_abs_sum",) if rescales else ()))


def stored_memory(name: str, shape: tuple[int, ...], n: int, params: GtaParams, in_place: bool = False):
    """Where the inputs are read as stored (combine_stored, magnitude_stored, random_stored): a
    float32 result block unless the kernels write the result in place (`in_place`), for magnitude
    sparsifiers the histograms (fused.MagnitudeStored and RadixSelect's), for random ones each
    expert's mask as bits, and numba's runtime. Random
    sparsifiers take that path only where numba's draws pass their check against the installed
    torch (math/torch_rand.py); elsewhere they keep the float32 code, which `memory` plans."""
    numel = math.prod(shape)
    if params.sparsify not in ("none", "magnitude", "magnitude_outliers", "random") or numel < fused.MIN_ELEMENTS:
        return None
    if params.sparsify in ("magnitude", "magnitude_outliers") and (params.rescale or params.tie_break != "index"):
        return None
    if params.sparsify == "random" and not torch_rand.available():
        return None
    from .base import BLOCK_ELEMENTS

    block = min(numel, BLOCK_ELEMENTS)
    # the capture's arrays are made empty and become resident as entries are kept: 1.5-3.5 % of a
    # tensor's entries where 1 in 32 (3.1 %) may be (one-off count, the tests' tensors), so half its bound
    capture = fused.capture_bytes(n, numel) // 2 if captures(params, n, numel) else 0
    magnitude = fused.histogram_bytes(n) + capture
    extra = {"none": 0, "random": n * ((numel + 7) // 8)}.get(params.sparsify, magnitude)
    result = 0 if in_place else 4 * block
    return Need(result + extra + fused.runtime_bytes(numel, kernels(params, stored=True)), transfer=block)


EXPERT_PARAMS = {"weight": REQUIRED, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}

METHOD = Method(
    "gta",
    GtaParams,
    merge,
    memory=memory,
    stored_memory=stored_memory,
    doc=__doc__ or "",
    propagates_nonfinite=True,
    expert_params=EXPERT_PARAMS,
    reads_once=reads_once,
    kernels=kernels,
)

# mergekit 0.1.5's generalized-task-arithmetic methods: (sparsifier, consensus, normalize, rescale) defaults
MERGEKIT_GTA = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", "none", False, True),
}
ALIASES = {
    name: ("gta", {"sparsify": sp, "consensus": cons, "normalize": norm, "rescale": resc})
    for name, (sp, cons, norm, resc) in MERGEKIT_GTA.items()
    if name not in ("task_arithmetic", "ties", "dare_ties", "dare_linear")  # those names are our own methods
}
