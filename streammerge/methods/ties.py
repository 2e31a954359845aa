"""ties: trim, elect sign, disjoint merge (Yadav et al., 2023).

Each task vector keeps its top `density` fraction by magnitude — per tensor (mergekit) or over
the expert's whole flattened model (`scope="model"`, the paper, fusion-bench and the OrthoMerge
authors). The sign of Σ w_i τ̂_i is elected per entry (entries summing to 0 take the tensor's
majority sign, +1 on a tie); entries agreeing with it are averaged (`merge="mean"`, disjoint
mean) or summed; the result is W_0 + λ · merged.

Thresholds are exact k-th largest magnitudes found without a sort: a radix select on the bits
of float32 magnitudes (non-negative floats order like their int32 bit patterns): one histogram
of the high 16 bits, then one of the low 16 bits inside the bin that holds the k-th value.

Streaming: when the N trimmed task vectors of a tensor fit `CACHE_BYTES`, each expert tensor is
read once (threshold from it in memory, trimmed, kept). Larger tensors (a 128k-vocabulary
embedding) go in row blocks: two histogram passes over the blocks, then the merge pass, so the
working set is N blocks. The majority sign of a block-streamed tensor is known only at its end:
entries whose elected sum is exactly 0 although some expert is non-zero get their value for
both signs, and the minority one is dropped at the end (rare: an exact cancellation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..math import fused
from ..plan import Need
from .base import (
    check_choice,
    BLOCK_ELEMENTS,
    Method,
    MapPass,
    ModelBlocks,
    Rows,
    TensorTask,
    check_finite,
    check_range,
    holds_whole,
    map_row_blocks,
)

CACHE_BYTES = 1 << 28  # the N trimmed task vectors of one tensor are kept whole up to this size


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    lambda_: float = 1.0
    merge: str = "mean"  # disjoint "mean" (paper) or "sum" (fusion-bench)
    scope: str = "tensor"  # where the top-k is taken: "tensor" or "model"

    def __post_init__(self) -> None:
        check_range("density", self.density, 0.0, 1.0, low_open=True)
        check_finite("lambda", self.lambda_)  # negative: task negation, as mergekit allows
        check_choice("merge", self.merge, ("mean", "sum"))
        check_choice("scope", self.scope, ("tensor", "model"))


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ⌊numel·density⌋, at least one."""
    return max(1, min(numel, int(numel * density)))


def magnitude(tau: torch.Tensor) -> torch.Tensor:
    """|τ| in float32: the values thresholds are found in and compared against."""
    return tau.abs().to(torch.float32)


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|τ| in float32 as int32 bit patterns (≥ 0, ordered like the magnitudes), flattened."""
    return magnitude(tau).view(torch.int32).reshape(-1)


class RadixSelect:
    """The exact k-th largest of a stream of non-negative float32 values, in two passes over it:
    feed every chunk's `magnitude_bits` to `add_high`, then again to `add_low`, then `value()`."""

    def __init__(self, k: int):
        self.k = k
        self.high = torch.zeros(1 << 16, dtype=torch.int64)
        self.low = torch.zeros(1 << 16, dtype=torch.int64)
        self.bin: int | None = None
        self.rank = 0
        self.above = 0  # after value(): how many values are larger than it
        self.equal = 0  # after value(): how many equal it

    def add_high(self, bits: torch.Tensor) -> None:
        self.high += torch.bincount(bits >> 16, minlength=1 << 16).cpu()

    def add_high_values(self, values: torch.Tensor) -> None:
        """add_high of float32 `values` themselves, in one fused pass (math/fused.py)."""
        fused.histogram_high(values, self.high)

    def add_low_values(self, values: torch.Tensor) -> None:
        fused.histogram_low(values, self.low_bin(), self.low)

    def low_bin(self) -> int:
        """The bin of high bits that holds the k-th largest (once every add_high is done)."""
        if self.bin is None:
            self._choose_bin()
        return self.bin  # type: ignore[return-value]

    def _choose_bin(self) -> None:
        from_top = self.high.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(self.k)))
        self.bin = (1 << 16) - 1 - j
        self.above = int(from_top[j]) - int(self.high[self.bin])
        self.rank = self.k - self.above  # rank inside the bin, from its top

    def add_low(self, bits: torch.Tensor) -> None:
        if self.bin is None:
            self._choose_bin()
        in_bin = bits[(bits >> 16) == self.bin]
        self.low += torch.bincount(in_bin & 0xFFFF, minlength=1 << 16).cpu()

    def value(self) -> float:
        from_top = self.low.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(self.rank)))
        lo = (1 << 16) - 1 - j
        self.equal = int(self.low[lo])
        self.above += int(from_top[j]) - self.equal
        bits = torch.tensor([(self.bin << 16) | lo], dtype=torch.int32)  # type: ignore[operator]
        return float(bits.view(torch.float32)[0])


def kth_largest_of_bits(bits: torch.Tensor, k: int) -> float:
    """The exact k-th largest magnitude, given one in-memory tensor's `magnitude_bits` (no sort)."""
    select = RadixSelect(k)
    select.add_high(bits)
    select.add_low(bits)
    return select.value()


def kth_largest_magnitude(tau: torch.Tensor, k: int) -> float:
    """The exact k-th largest |τ| of one in-memory tensor (no sort)."""
    return kth_largest_of_bits(magnitude_bits(tau), k)


def _bits_of(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32)[0])


def trim(tau: torch.Tensor, threshold: float, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the entries with |τ| below `threshold`, comparing float32 bit patterns (the order
    of the magnitudes; a NaN, allowed by --allow-nonfinite, counts as the largest and is kept).
    `bits`: τ's `magnitude_bits` if the caller has them already."""
    if bits is None:
        bits = magnitude_bits(tau)
    return tau.mul_((bits >= _bits_of(threshold)).view(tau.shape))


class DisjointMerge:
    """Sign election and disjoint mean/sum, block by block over one tensor.

    `block(vectors, base)` returns W_0 + λ·merged for one row block given its N processed task
    vectors, with entries of zero elected sum taking +1; `finish(out)` applies the tensor's
    majority sign where it is −1 (only entries with an exact cancellation change)."""

    def __init__(self, merge_kind: str, lambda_: float):
        self.merge_kind, self.lambda_ = merge_kind, lambda_
        self.balance = 0  # Σ sign(elected sum) over the tensor: its majority sign
        self.offset = 0  # flat index of the current block's first entry
        self.alternatives: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat index, value if −1)

    def block(self, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        if fused.available(base, *vectors):
            out, undecided, balance = fused.disjoint(vectors, base, self.merge_kind == "mean", self.lambda_)
            self.balance += balance
            if bool(undecided.any()):
                self._alternative(vectors, base, undecided.reshape(-1).nonzero().squeeze(1))
            self.offset += base.numel()
            return out
        total = torch.zeros_like(base)
        for v in vectors:
            total.add_(v)
        sign = torch.sign(total)
        self.balance += int(sign.sum(dtype=torch.float64))  # exact: a sum of ±1 and 0
        undecided = sign == 0
        sign.masked_fill_(undecided, 1.0)
        total.zero_()
        count = torch.zeros_like(base)
        for v in vectors:
            agree = (torch.sign(v) == sign) & (v != 0)
            total.add_(v * agree)
            count.add_(agree)
        # an elected sum of exactly 0 with some expert non-zero means experts of both signs, so
        # there (and only there) some expert agreed with the provisional +1
        undecided &= count > 0
        if self.merge_kind == "mean":
            total.div_(count.clamp_(min=1))
        if bool(undecided.any()):
            self._alternative(vectors, base, undecided.reshape(-1).nonzero().squeeze(1))
        self.offset += base.numel()
        return base + self.lambda_ * total

    def _alternative(self, vectors: list[torch.Tensor], base: torch.Tensor, idx: torch.Tensor) -> None:
        """The merged value at `idx` had the elected sign been −1 (same arithmetic as `block`)."""
        self.alternative_at(idx, [v.reshape(-1)[idx] for v in vectors], base.reshape(-1)[idx])

    def alternative_at(self, idx: torch.Tensor, values: list[torch.Tensor], base: torch.Tensor) -> None:
        """_alternative given the vectors' and the base's values at the block's flat indices `idx`."""
        total = torch.zeros(idx.numel(), dtype=base.dtype, device=base.device)
        count = torch.zeros_like(total)
        for vals in values:
            agree = (torch.sign(vals) == -1.0) & (vals != 0)
            total.add_(vals * agree)
            count.add_(agree)
        if self.merge_kind == "mean":
            total.div_(count.clamp_(min=1))
        value = base + self.lambda_ * total
        self.alternatives.append(((idx + self.offset).cpu(), value.cpu()))

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.balance < 0:
            flat = out.view(-1)
            for idx, value in self.alternatives:  # kept on the CPU while the tensor streams
                flat[idx.to(out.device)] = value.to(out.device, out.dtype)
        return out


def disjoint_merge_blocks(
    task: TensorTask, vectors: Callable[[Rows | None], list[torch.Tensor]], merge_kind: str, lambda_: float
) -> torch.Tensor:
    """W_0 + λ · disjoint merge of `vectors(rows)` (the processed task vectors of a row block)."""
    dm = DisjointMerge(merge_kind, lambda_)
    return dm.finish(map_row_blocks(task, lambda rows: dm.block(vectors(rows), task.base_rows(rows))))


def _density(task: TensorTask, params: TiesParams, i: int) -> float:
    d = task.densities[i] if task.densities and task.densities[i] is not None else params.density
    return float(d)


def block_thresholds(task: TensorTask, densities: list[float]) -> list[float]:
    """Each expert's exact per-tensor threshold, by two histogram passes over the row blocks."""
    numel = math.prod(task.shape)
    selects = [RadixSelect(keep_count(numel, d)) for d in densities]
    for stage in ("add_high", "add_low"):
        for rows in task.row_blocks():
            for i, select in enumerate(selects):
                getattr(select, stage)(magnitude_bits(task.task_vector(i, rows)))
    return [s.value() for s in selects]


StoredInputs = Callable[[Rows | None], tuple[torch.Tensor, list[torch.Tensor]]]


def stored_bf16(task: TensorTask) -> StoredInputs | None:
    """`inputs(rows)`: the base's and the experts' rows as stored (TensorTask.stored), where the
    fused kernels can read them: every input a bf16 CPU tensor, float32 compute (the kernels'
    arithmetic), numba present, a tensor worth a kernel call. None otherwise."""
    if task.stored is None or not fused.reads_stored(task.dtype, "cpu", [], math.prod(task.shape)):
        return None
    stored = task.stored

    def inputs(rows: Rows | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return stored(None, rows), [stored(i, rows) for i in range(len(task.weights))]

    base, experts = inputs(task.row_blocks()[0])
    first = (base, *experts)
    on = {t.device.type for t in first}
    if len(on) == 1 and fused.reads_stored(task.dtype, on.pop(), [t.dtype for t in first], math.prod(task.shape)):
        return inputs if all(t.is_contiguous() for t in first) else None
    return None


def count_thresholds(counts: fused.MagnitudeStored, inputs, blocks: list, selects: list[list[RadixSelect]],
                     numel: int, capture: bool = False) -> None:  # fmt: skip
    """Each select's histograms of high and low bits (RadixSelect.high, .low; selects[i]: expert i's,
    none, one, or a breadcrumbs window's two), exact, from passes over the inputs. A tensor of
    fused.SPAN_ELEMENTS: a sample of 1 in SAMPLE_EVERY guesses each threshold's bin of high bits,
    and the pass that counts the high bits counts the low bits of the SPAN bins around the guess
    too; a select whose bin (known once the high bits are) lies outside, and every select of
    other tensors, gets a pass of low bits of its own (one bin per expert and pass; a breadcrumbs
    window's two thresholds share it where they share a bin). The guess decides only how many
    passes are made: the counts, and so the thresholds, are the same. `capture`: the spanned pass
    also keeps where the entries of its bins are, for MagnitudeStored.combine's tie counts
    (gta.captures says when)."""
    high_only = [-1 if sel else -2 for sel in selects]
    lo, spans = high_only, False
    if fused.SPAN_ELEMENTS[0] <= numel < fused.SPAN_ELEMENTS[1]:
        sample = counts.count_span(inputs, blocks, high_only, fused.SAMPLE_EVERY)
        lo = [guessed_span(sel, sample[i], numel) for i, sel in enumerate(selects)]
        highs, spans = counts.count_span(inputs, blocks, lo, capture=capture), True
    else:
        highs = counts.count_span(inputs, blocks, high_only)
    found = [[False] * len(sel) for sel in selects]
    for i, sel in enumerate(selects):
        for j, s in enumerate(sel):
            s.high.add_(highs[i])
            d = s.low_bin() - lo[i]
            if spans and lo[i] >= 0 and 0 <= d < fused.SPAN:
                s.low.add_(counts.span_low(i, d))
                found[i][j] = True
    while True:
        chosen = [-2] * len(selects)
        for i, sel in enumerate(selects):
            missing = [s.low_bin() for j, s in enumerate(sel) if not found[i][j]]
            chosen[i] = missing[0] if missing else -2
        if all(c == -2 for c in chosen):
            return
        lows = counts.count_low(inputs, blocks, chosen)
        for i, sel in enumerate(selects):
            for j, s in enumerate(sel):
                if not found[i][j] and s.low_bin() == chosen[i]:
                    s.low.add_(lows[i])
                    found[i][j] = True


def guessed_span(sel: list[RadixSelect], sample: torch.Tensor, numel: int) -> int:
    """The first bin of the SPAN bins of high bits that should hold the thresholds of `sel` (the
    sample's own k-th largest, k scaled to the sample, in the middle; −2: no thresholds), or −1 (no
    span) where the sample is empty. A breadcrumbs window's two thresholds too far apart for one
    span: the first's (the second gets a pass)."""
    total = int(sample.sum())
    if not sel or total == 0:
        return -1 if sel else -2
    from_top = sample.flip(0).cumsum(0)
    bins = []
    for s in sel:
        j = int(torch.searchsorted(from_top, torch.tensor(max(1, round(s.k * total / numel)))))
        bins.append((1 << 16) - 1 - min(j, (1 << 16) - 1))
    first = min(bins) - fused.SPAN // 2
    return max(0, first if max(bins) - first < fused.SPAN else bins[0] - fused.SPAN // 2)


def merge_stored(task: TensorTask, params: TiesParams, densities: list[float],
                 thresholds: list[float] | None) -> torch.Tensor | None:  # fmt: skip
    """ties of bf16 inputs read as stored, in fused passes (math/fused.py MagnitudeStored): each
    threshold (unless the model's are given) from histogram passes over the inputs
    (count_thresholds), then one pass that trims, weights and merges. The bytes of the code in
    `merge`, which forms every τ_i in float32 and passes over it three times more
    (tests/test_fused.py). None where it does not apply (then that code runs)."""
    inputs = stored_bf16(task)
    if inputs is None:
        return None
    blocks = task.row_blocks()
    kernels = fused.MagnitudeStored.for_experts(len(densities))
    if thresholds is None:
        selects = [RadixSelect(keep_count(math.prod(task.shape), d)) for d in densities]
        count_thresholds(kernels, inputs, blocks, [[s] for s in selects], math.prod(task.shape))
        thresholds = [s.value() for s in selects]
    bounds = [_bits_of(t) for t in thresholds]  # compared as bit patterns, as `trim` compares them
    dm = DisjointMerge(params.merge, params.lambda_)

    def block(rows: Rows | None) -> torch.Tensor:
        base, experts = inputs(rows)
        out, undecided, balance = kernels.disjoint(experts, base, bounds, task.weights, params.merge == "mean",
                                                   params.lambda_)  # fmt: skip
        dm.balance += balance
        if bool(undecided.any()):  # rare: the values at the few entries whose elected sum is exactly 0
            idx = undecided.reshape(-1).nonzero().squeeze(1)
            b = base.reshape(-1)[idx].float()
            values = []
            for e, threshold, w in zip(experts, thresholds, task.weights):
                tau = e.reshape(-1)[idx].float().sub_(b)
                values.append(trim(tau, threshold).mul_(w))
            dm.alternative_at(idx, values, b)
        dm.offset += base.numel()
        return out

    return dm.finish(map_row_blocks(task, block))


def merge(task: TensorTask, params: TiesParams) -> torch.Tensor:
    n = len(task.weights)
    densities = [_density(task, params, i) for i in range(n)]
    if params.scope == "model":
        thresholds: list[float] | None = list(task.statistics)
    else:
        thresholds = None
    fast = merge_stored(task, params, densities, thresholds)
    if fast is not None:
        return fast
    if holds_whole(task, n, CACHE_BYTES):
        kept = []  # each expert read once: threshold, trim and weight in memory
        for i in range(n):
            tau = task.task_vector(i)
            if fused.available(tau):  # the same threshold and mask in one pass each (math/fused.py)
                if thresholds is not None:
                    threshold = thresholds[i]
                else:
                    select = RadixSelect(keep_count(tau.numel(), densities[i]))
                    select.add_high_values(tau)
                    select.add_low_values(tau)
                    threshold = select.value()
                if fused.finite_bound(_bits_of(threshold)):  # every tie at it is kept: [0, numel)
                    fused.mask_magnitude(tau, _bits_of(threshold), 0, tau.numel(), 0, task.weights[i])
                    kept.append(tau)
                    continue
            bits = magnitude_bits(tau)
            threshold = (
                thresholds[i]
                if thresholds is not None
                else kth_largest_of_bits(bits, keep_count(tau.numel(), densities[i]))
            )
            kept.append(trim(tau, threshold, bits).mul_(task.weights[i]))
            del bits

        def vectors(rows: Rows | None) -> list[torch.Tensor]:
            return kept if rows is None else [v[rows[0] : rows[1]] for v in kept]
    else:
        if thresholds is None:
            thresholds = block_thresholds(task, densities)
        final = thresholds

        def vectors(rows: Rows | None) -> list[torch.Tensor]:
            return [trim(task.task_vector(i, rows), final[i]).mul_(task.weights[i]) for i in range(n)]

    return disjoint_merge_blocks(task, vectors, params.merge, params.lambda_)


def high_histograms(blocks: ModelBlocks, n_experts: int) -> tuple[int, list[torch.Tensor]]:
    """First radix pass over part of the model: (values seen per expert, each expert's histogram
    of the high 16 bits of |τ|)."""
    total = 0
    highs = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_experts)]
    for _, base, experts in blocks:
        total += base.numel()
        for i in range(n_experts):
            highs[i] += torch.bincount(magnitude_bits(experts[i].sub_(base)) >> 16, minlength=1 << 16).cpu()
    return total, highs


def low_histograms(blocks: ModelBlocks, n_experts: int, bins: list[int]) -> list[torch.Tensor]:
    """Second radix pass: each expert's histogram of the low 16 bits of the |τ| in its chosen bin."""
    lows = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_experts)]
    for _, base, experts in blocks:
        for i in range(n_experts):
            bits = magnitude_bits(experts[i].sub_(base))
            lows[i] += torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=1 << 16).cpu()
    return lows


def model_thresholds(map_pass: MapPass, n_experts: int, densities: list[float]) -> list[float]:
    """Each expert's exact k-th largest |τ| over all of its tensors (radix select: two passes over
    the model, each a map over its parts whose histograms are summed)."""
    highs = map_pass(high_histograms, n_experts)
    total = sum(t for t, _ in highs)
    selects = []
    for i in range(n_experts):
        s = RadixSelect(keep_count(total, densities[i]))
        s.high = sum((h[i] for _, h in highs), torch.zeros(1 << 16, dtype=torch.int64))
        s._choose_bin()
        selects.append(s)
    lows = map_pass(low_histograms, n_experts, [s.bin for s in selects])
    for i, s in enumerate(selects):
        s.low = sum((low[i] for low in lows), torch.zeros(1 << 16, dtype=torch.int64))
    return [s.value() for s in selects]


def statistics(map_pass: MapPass, n_experts: int, params: TiesParams, model_values=None):
    """Each expert's magnitude threshold over its whole model (scope model); `model_values`: each
    expert's density (None: the method's)."""
    if params.scope != "model":
        return None
    values = model_values or [{}] * n_experts
    densities = [v.get("density") if v.get("density") is not None else params.density for v in values]
    return model_thresholds(map_pass, n_experts, densities)


def memory(name: str, shape: tuple[int, ...], n: int, params: TiesParams, itemsize: int):
    """One block: the N trimmed vectors plus about 6 tensor-sized temporaries of the sign
    election; cached: the N vectors and the base whole, temporaries per block; streamed: all
    of it per block. At least numba's runtime where the kernels take the tensor (inputs not all
    bf16): the constants hold it for large tensors; fp16 toy models of small ones measured 13 %
    above a plan without it (tests/test_plan_budget.py)."""

    numel = math.prod(shape)
    block = min(numel, BLOCK_ELEMENTS)
    if numel <= BLOCK_ELEMENTS:
        need = Need(int((n + 6) * numel * itemsize))
    elif n * numel * itemsize <= CACHE_BYTES:  # the N vectors and the whole base, blocks of temporaries
        need = Need(int((n + 1) * numel * itemsize + 6 * block * itemsize))
    else:
        need = Need(int((n + 7) * block * itemsize), transfer=block)
    return replace(need, work=max(need.work, fused.runtime_bytes(numel, kernels(params, stored=False))))


def kernels(params: TiesParams, stored: bool) -> tuple[str, ...]:
    """The numba kernels the merge calls (fused.runtime_bytes: its plan asks numba's cache for them;
    tests/test_fused.py compares them with a merge's): reading as stored, the thresholds' histograms
    (the model-wide threshold is found before, by torch) and the disjoint merge; else the float32
    histogram, mask and disjoint merge."""
    if stored:
        histograms = () if params.scope == "model" else ("_histogram_low_bf16", "_histogram_span_bf16")
        return (*histograms, "_magnitude_disjoint_bf16")
    return ("_histogram", "_mask_magnitude", "_disjoint")


def stored_memory(name: str, shape: tuple[int, ...], n: int, params: TiesParams, in_place: bool = False):
    """Where the inputs are read as stored (merge_stored): a float32 result block (its kernel does
    not write in place, whatever `in_place` says), the undecided entries' mask, the histograms,
    numba's runtime."""
    if math.prod(shape) < fused.MIN_ELEMENTS:
        return None
    block = min(math.prod(shape), BLOCK_ELEMENTS)
    runtime = fused.runtime_bytes(math.prod(shape), kernels(params, stored=True))
    return Need(5 * block + fused.histogram_bytes(n) + runtime, transfer=block)


METHOD = Method(
    "ties",
    TiesParams,
    merge,
    memory=memory,
    stored_memory=stored_memory,
    statistics=statistics,
    statistics_passes=lambda p: 2 if p.scope == "model" else 0,
    statistics_values=("density",),
    expert_params={"weight": 1.0, "density": None},
    doc=__doc__ or "",
    propagates_nonfinite=True,
    # mergekit's ties runs as gta, which has it; ours keeps every entry tied at the threshold
    param_hints={"tie_break": "tie_break belongs to mergekit's ties: a mergekit recipe, or --method gta"},
    kernels=kernels,
)
