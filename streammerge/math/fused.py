"""Fused elementwise kernels for the TIES family (numba, the `fast` extra), each one pass over
memory where the torch code makes several; torch's code (methods/gta.py, ties.py) stays the
reference and the fallback, and these give the same bytes (tests/test_fused.py).

Every kernel repeats the torch code's float32 operations in the same order per entry
(sequential sums over experts in their order, the same products by 0/1 masks, IEEE division),
and numba's default, non-fastmath arithmetic contracts nothing into FMAs, so results are
bitwise equal. Entries are independent, so splitting them over threads changes nothing; the
one sequential rule (the earliest tied entries are kept) runs as a per-chunk count, a prefix
sum and a second parallel pass. Used for float32 CPU tensors of at least MIN_ELEMENTS entries:
smaller ones are not worth a kernel call, and the first call in a process compiles (a few
seconds, cached on disk after that).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from types import ModuleType

import torch

MIN_ELEMENTS = 1 << 16

_kernels: ModuleType | None = None  # compiled on first use: importing numba takes most of a second
_tried = False
_compiled = {"kernels": 0, "seconds": 0.0}  # numba's compiles in this process (compile_seconds)

log = logging.getLogger(__name__)


def installed() -> bool:
    """numba is importable and not switched off (STREAMMERGE_NO_NUMBA=1 forces torch's code)."""
    return not os.environ.get("STREAMMERGE_NO_NUMBA") and importlib.util.find_spec("numba") is not None


def missing() -> str | None:
    """What to tell someone whose merge would take the kernels, where numba is not installed (None
    where it is, switched off or not). The figure: bench/results/fused-ab-ties-0.5b-vs-torch.md."""
    if importlib.util.find_spec("numba") is not None:
        return None
    return (
        "numba is not installed, so torch's code runs in place of the fused kernels (2.3-3.2x as long for TIES "
        "on two cores); pip install 'streammerge[fast]'"
    )


def available(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels take these tensors: numba present, `dtype`, CPU, contiguous, large."""
    return (
        tensors[0].numel() >= MIN_ELEMENTS
        and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and _load() is not None
    )


def reads_stored(compute_dtype: torch.dtype, device: str, stored: list[torch.dtype], numel: int) -> bool:
    """Whether the kernels read a tensor's inputs as stored (bf16, widened as they read): float32
    compute, on the CPU, numba installed, every input stored as bf16, a tensor worth a kernel call.
    The one rule for the methods that take that path and for the plan that counts its memory."""
    return (
        compute_dtype == torch.float32
        and device == "cpu"
        and installed()
        and numel >= MIN_ELEMENTS
        and all(d == torch.bfloat16 for d in stored)
    )


def _flat(t: torch.Tensor):
    return t.detach().view(-1).numpy()


def _threads() -> int:
    """As many threads as torch uses (--threads), within numba's pool; returns that count. Each
    kernel's parts go to whichever thread is free, one at a time (chunk size 1), not in equal
    shares fixed in advance: a thread that shares its core with the shard writer would otherwise
    leave the other waiting (bench/results/README.md, "Round seven")."""
    _load()  # first: importing the kernels chooses numba's threading layer, which starts here
    import numba

    asked = torch.get_num_threads()
    n = max(1, min(asked, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    numba.set_parallel_chunksize(1)
    if torch.get_num_threads() != asked:  # numba's OpenMP layer, starting, set the count for every core
        torch.set_num_threads(asked)
    return n


# Parts per thread of the kernels whose state per part is small (not the histograms'): enough for
# the free threads to even out what a slower one leaves. Sums over parts are integers and entries
# are independent, so the count changes no byte (tests/test_fused.py, any thread count).
PARTS_PER_THREAD = 8


def _parts() -> int:
    return _threads() * PARTS_PER_THREAD


def _load() -> ModuleType | None:
    global _kernels, _tried
    if not _tried:
        _tried = True
        if installed():
            from . import fused_kernels

            _watch_compiles()
            _kernels = fused_kernels
    return _kernels


def _watch_compiles() -> None:
    """numba compiles a kernel where its cache on disk has none for these argument types: on the
    first merge after installing or upgrading (5-10 s per method here, bench/results/README.md),
    during which the merge's first tensor waits. Say so, once, and count the seconds."""
    from numba.core import event

    class Compiles(event.Listener):
        depth, started = 0, 0.0  # a kernel's compile compiles the kernels it calls inside it

        def on_start(self, ev) -> None:
            if self.depth == 0:
                self.started = time.monotonic()
                if not _compiled["kernels"]:
                    log.info("compiling numba kernels (the first merge with this method after installing or "
                             "upgrading; kept in numba's cache after that)")  # fmt: skip
            self.depth += 1

        def on_end(self, ev) -> None:
            self.depth -= 1
            if self.depth == 0:
                _compiled["kernels"] += 1
                _compiled["seconds"] += time.monotonic() - self.started
                _cached.clear()  # written now: asked again

    event.register("numba:compile", Compiles())


def compile_seconds() -> float:
    """Seconds numba has spent compiling kernels in this process (none where its cache held them)."""
    return _compiled["seconds"]


def histogram_high(values: torch.Tensor, hist: torch.Tensor) -> None:
    """hist += bincount(magnitude bits >> 16) of float32 `values` (RadixSelect.add_high)."""
    _load()._histogram(_flat(values), -1, hist.numpy(), _threads())


def histogram_low(values: torch.Tensor, chosen: int, hist: torch.Tensor) -> None:
    """hist += bincount of the low 16 bits of the magnitudes in high bin `chosen` (add_low)."""
    _load()._histogram(_flat(values), chosen, hist.numpy(), _threads())


def finite_bound(bound: int) -> bool:
    """Whether the bit pattern `bound` (a threshold's) is a finite float32: the mask compares
    floats, which order like the bit patterns of non-negative finite values (NaN, above ∞ in bit
    order, is kept as the torch code keeps it)."""
    return 0 <= bound < 0x7F800000


def mask_magnitude(values: torch.Tensor, bound: int, lo: int, hi: int, seen: int, weight: float) -> int:
    """In place: keep magnitudes above `bound` (bits of a finite float32, finite_bound) and the
    ties at it numbered [lo, hi) (counting `seen` before this tensor), times `weight`; returns the
    ties counted here."""
    value = float(torch.tensor([bound], dtype=torch.int32).view(torch.float32)[0])
    return int(_load()._mask_magnitude(_flat(values), value, lo, hi, seen, weight, _parts()))


def della_keep(rows: torch.Tensor, draws: torch.Tensor, keep_below: torch.Tensor) -> None:
    """rows ← rows·(draws < keep_below[rank]) in place, rank an entry's position in torch's stable
    argsort of its row's |rows| (NaN last, ties in index order): methods/gta.py's della_magprune
    mask, found by a radix sort of the magnitudes' bit patterns per row instead of a sort and a
    scatter. Multiplied by 1 or 0 as torch multiplies by the mask (−0, NaN as there)."""
    _threads()
    _load()._della_keep(rows.detach().numpy(), draws.numpy(), keep_below.numpy())


def combine(vectors: list[torch.Tensor], weights, base: torch.Tensor, consensus: str, normalize: bool,
            lambda_: float) -> torch.Tensor:  # fmt: skip
    """gta.combine in one pass: W₀ + λ·(normalised) Σ v_i with the consensus mask."""
    out = torch.empty_like(base)
    _load()._combine(
        tuple(_flat(v) for v in vectors),
        _flat(base),
        _flat(out),
        *_combine_args(weights, consensus, normalize, lambda_),
        _parts(),
    )
    return out


def _combine_args(weights, consensus: str, normalize: bool, lambda_: float) -> tuple:
    """The combine kernels' weights (float32), consensus code, normalisation, divisor of the
    consensus-free sum (Σ w_i, or 1 where it is about 0, as gta.combine) and λ."""
    import numpy as np

    divisor = float(sum(weights))
    if abs(divisor) < 1e-8:
        divisor = 1.0
    code = {"none": 0, "sum": 1, "count": 2}[consensus]
    return np.asarray(weights, dtype=np.float32), code, normalize, np.float32(divisor), float(lambda_)


def combine_bf16(experts: list[torch.Tensor], weights, base: torch.Tensor, consensus: str, normalize: bool,
                 lambda_: float, into: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """combine of the weighted task vectors (W_i − W₀)·w_i, read from the bf16 tensors as stored
    and widened in the kernel: one pass where widening every input to float32 first takes two
    more and twice the memory. Returns float32, or `into` rounded to bf16 (_rounded says when)."""
    import numpy as np

    n = len(experts)
    unmasked = np.zeros((n, 1), dtype=np.uint8)
    return random_combine_bf16(experts, base, unmasked, 0, [False] * n, [0.0] * n, weights, consensus, normalize,
                               lambda_, into)  # fmt: skip


def rounds_into(dtype: torch.dtype) -> bool:
    """Whether the combine kernels write a result of this output dtype in place (_rounded): bf16."""
    return dtype == torch.bfloat16


def _rounded(kernel, shape, into: torch.Tensor | None) -> torch.Tensor:
    """kernel(out, out16), a combine kernel writing its float32 result to `out` or rounded to bf16 in
    `out16` (math/fused_kernels.py _store), run for the result: `into` (a bf16 tensor of `shape`,
    the output's own rows: TensorTask.store_into), written in place, where every entry is finite
    (the bytes torch's conversion of the float32 result gives: one pass, no float32 result), else
    float32, as torch's code leaves it for the caller to convert (and `into` is to be overwritten)."""
    import numpy as np

    if into is not None and rounds_into(into.dtype):
        if kernel(np.empty(0, np.float32), _flat(into.view(torch.int16)).view("uint16")) == 0:
            return into
    out = torch.empty(shape, dtype=torch.float32)
    kernel(_flat(out), np.empty(0, np.uint16))
    return out


def disjoint(vectors: list[torch.Tensor], base: torch.Tensor, mean: bool, lambda_: float):
    """ties.DisjointMerge.block in one pass: (W₀ + λ·disjoint merge, the undecided entries' mask
    (bool), Σ sign(elected sum))."""
    out = torch.empty_like(base)
    undecided = torch.empty(base.shape, dtype=torch.bool)
    balance = _load()._disjoint(
        tuple(_flat(v) for v in vectors), _flat(base), _flat(out), undecided.view(-1).numpy(), mean,
        float(lambda_), _parts(),
    )  # fmt: skip
    return out, undecided, int(balance)


def mt_seed(seed: int, state) -> None:
    _load()._mt_seed(seed, state)


def mt_uniform(state, pos: int, out: torch.Tensor) -> int:
    return int(_load()._mt_uniform(state, pos, _flat(out)))


def mt_keep(values: torch.Tensor, state, pos: int, threshold: int, below: bool) -> int:
    return int(_load()._mt_keep(_flat(values), state, pos, threshold, below))


def mt_keep_bits_each(states, positions, thresholds, below: bool, keep, rows, bit0: int, n: int) -> None:
    _threads()
    _load()._mt_keep_bits_each(states, positions, thresholds, below, keep, rows, bit0, n)


def random_norms_bf16(experts: list[torch.Tensor], base: torch.Tensor, keep, rows: list[int], bit0: int, before,
                      after) -> None:  # fmt: skip
    """For each listed expert t (experts[rows[t]]), the exact_sum accumulators of |τ| and |τ·keep|
    (τ = expert − base, bf16 as stored; keep[rows[t]]: the entries' bits from bit0), += into
    before[t] and after[t] (arrays of accumulators, one row each)."""
    import numpy as np

    bits = _stored_bits([base, *experts])
    _load()._random_norms_bf16(bits[1:], bits[0], keep, np.asarray(rows, dtype=np.int64), bit0, before, after,
                               _parts())  # fmt: skip


def random_combine_bf16(experts: list[torch.Tensor], base: torch.Tensor, keep, bit0: int, masked, ratios, weights,
                        consensus: str, normalize: bool, lambda_: float,
                        into: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """W₀ + λ·combine of the randomly sparsified, rescaled, weighted task vectors of one block of bf16
    tensors as stored (float32, or bf16 as _rounded says): expert i's τ_i·keep[i] (its bits from
    bit0) where masked[i], then ·ratios[i] where that is not 0, then ·w_i (math/fused_kernels.py
    _random_combine_bf16)."""
    import numpy as np

    bits = _stored_bits([base, *experts])
    masked, ratios = np.asarray(masked, dtype=np.bool_), np.asarray(ratios, dtype=np.float32)
    args = _combine_args(weights, consensus, normalize, lambda_)
    return _rounded(
        lambda out, out16: _load()._random_combine_bf16(bits[1:], bits[0], out, out16, keep, bit0, masked, ratios,
                                                        *args, _parts()),
        base.shape, into,
    )  # fmt: skip


def exact_abs_sum(values: torch.Tensor, acc) -> None:
    """math/exact_sum.py's accumulator of float32 `values`, += into acc."""
    _load()._exact_abs_sum(_flat(values), acc, _parts())


def _stored_bits(tensors: list[torch.Tensor]) -> tuple:
    """bf16 tensors (as stored) as the uint16 arrays the kernels read."""
    return tuple(_flat(t.view(torch.int16)).view("uint16") for t in tensors)


# Anonymous memory numba's runtime takes once its kernels run in a process (its threading layer,
# the compiled code loaded from its cache): about 20 MB to import (which planning does: the plan's
# baseline is taken before) and 20-30 MB per kernel loaded (memwatch.rss_anon around each step, a
# one-off); an allowance, not a bound, that the plans of the paths reading inputs as stored count
# (tests/test_plan_budget.py holds them within 25 % of the measured peaks).
RUNTIME_BYTES = 64 << 20


# What compiling the kernels keeps on top of that (numba's compiled libraries; measured in a merge's
# peak: 78 MB for TIES, 87 for DARE-TIES, one-off; bench/results/README.md, "Round twelve").
COMPILE_BYTES = 96 << 20
_cached: list[frozenset[str] | None] = []  # _cached_kernels's answer, until a compile writes the cache


def runtime_bytes(numel: int, kernels: tuple[str, ...]) -> int:
    """RUNTIME_BYTES where a kernel may take a tensor of `numel` entries (numba installed, at least
    MIN_ELEMENTS), for the plans; with COMPILE_BYTES where numba's cache lacks one of `kernels`, the
    ones the method's path calls (by name, as in math/fused_kernels.py; a kernel they call inside is
    compiled with them): its first merge compiles them. Else 0."""
    if numel < MIN_ELEMENTS or not installed():
        return 0
    cached = _cached_kernels()
    return RUNTIME_BYTES + (COMPILE_BYTES if cached is not None and not cached.issuperset(kernels) else 0)


def _cached_kernels() -> frozenset[str] | None:
    """The kernels numba's cache holds compiled from fused_kernels.py as it is now (an index file
    newer than the source; none after installing, upgrading or changing the cache folder); None
    where that cannot be told (numba's layout changed, the folder is unreadable: planned as before)."""
    if not _cached:
        kernels = _load()
        try:
            folder = kernels._histogram.stats.cache_path  # type: ignore[union-attr]
            made = os.path.getmtime(kernels.__file__)  # type: ignore[union-attr]
            names = os.listdir(folder) if os.path.isdir(folder) else []
            # fused_kernels.NAME-LINE.pyXY.nbi
            _cached.append(
                frozenset(
                    n.removeprefix("fused_kernels.").rsplit("-", 1)[0]
                    for n in names
                    if n.startswith("fused_kernels.")
                    and n.endswith(".nbi")
                    and os.path.getmtime(os.path.join(folder, n)) >= made
                )
            )
        except (AttributeError, OSError):
            _cached.append(None)
    return _cached[0]


SPAN = 3  # bins of high bits around the sample's guess whose low bits the high pass counts too
SAMPLE_EVERY = 8  # the sample: one run of WIDEN entries in every 8
CAPTURE_SHARE = 32  # count_span keeps where the span's entries are, up to 1 in 32 of a block's entries
CAPTURE_BYTES = 64 << 20  # and only for tensors whose capture takes at most this (capture_bytes)
SPAN_ELEMENTS = (1 << 20, 1 << 31)  # tensors the sample serves: smaller ones' passes cost less than
# the spans' upkeep; larger ones might overflow a part's int32 span counts


def histogram_bytes(n_experts: int) -> int:
    """The histograms a MagnitudeStored holds for `n_experts` (one per thread and expert, and the
    spans' SPAN per thread and expert, int32), with the two of each expert's RadixSelect
    (methods/ties.py) and their sum."""
    threads = max(1, torch.get_num_threads())
    return n_experts * ((threads + 3) * 8 + threads * SPAN * 4) * (1 << 16)


def capture_bytes(n_experts: int, numel: int) -> int:
    """What count_span's capture of a tensor takes (8 bytes for each of up to 1 in CAPTURE_SHARE entries
    per expert), or 0 where that exceeds CAPTURE_BYTES (then no capture: a pass counts the ties)."""
    size = n_experts * -(-numel // CAPTURE_SHARE) * 8
    return size if size <= CAPTURE_BYTES else 0


_MAGNITUDE_STORED: dict = {}  # MagnitudeStored.for_experts


def release() -> None:
    """Drop what MagnitudeStored.for_experts keeps from tensor to tensor (the engine, when a merge
    ends: a process that merges again, or does other work, does not hold it)."""
    _MAGNITUDE_STORED.clear()


class MagnitudeStored:
    """gta's magnitude sparsifier and combine of bf16 tensors as stored, in row blocks: thresholds
    from histograms of the task vectors widened in the kernel (`count_span` of the high bits over
    every block, then `count_low` of the low bits; or a sample, then both in one `count_span`, as
    methods/ties.count_thresholds decides), then `combine` of each block in order, the tie counters
    running on across blocks (math/fused_kernels.py; gta.magnitude_stored says when)."""

    def __init__(self, n_experts: int):
        import numpy as np

        self.parts = _threads()  # the histograms': one each (64k counts per expert)
        self.pieces = _parts()  # the other passes'
        self.hist = np.zeros((self.parts, n_experts, 1 << 16), dtype=np.int64)
        # int32: a part counts at most numel / parts entries (SPAN_ELEMENTS: below 2³¹)
        self.span = np.zeros((self.parts, n_experts, SPAN, 1 << 16), dtype=np.int32)
        self.span_counted = False  # span holds counts (zeroed before the next pass that counts it)
        self.captured: dict = {}  # count_span's capture: rows → (lo, indices, codes, counts)

    @classmethod
    def for_experts(cls, n_experts: int) -> "MagnitudeStored":
        """One per expert count and thread count, kept for the next tensor (every count leaves its
        histograms at zero): making and zeroing 8 MB of histograms per tensor took 3 % of a merge."""
        key = (n_experts, _threads(), _parts())
        if key not in _MAGNITUDE_STORED:
            _MAGNITUDE_STORED.clear()
            _MAGNITUDE_STORED[key] = cls(n_experts)
        return _MAGNITUDE_STORED[key]

    def count_low(self, inputs, blocks: list, chosen: list[int]) -> torch.Tensor:
        """The low bits of the magnitudes in bin chosen[i] of high bits (< 0: expert i skipped) over
        every block (`inputs(rows)`: the block's base and experts as stored), (expert, 2¹⁶), summed
        over the parts; counting starts again at zero. The high bits: count_span."""
        import numpy as np

        chosen_bins = np.asarray(chosen, dtype=np.int64)
        for rows in blocks:
            base, experts = inputs(rows)
            bits = _stored_bits([base, *experts])
            _threads()
            _load()._histogram_low_bf16(bits[1:], bits[0], chosen_bins, self.hist, self.parts)
        out = torch.from_numpy(self.hist.sum(axis=0))
        self.hist[:] = 0
        return out

    def count_span(self, inputs, blocks: list, lo: list[int], every: int = 1, capture: bool = False) -> torch.Tensor:
        """count's high bits of every expert (lo[i] −2: none) and, in the same pass, the low bits of
        the entries whose high bits lie in [lo[i], lo[i] + SPAN) where lo[i] ≥ 0 (span_low);
        `every` > 1 counts a sample of the high bits only (SAMPLE_EVERY). For tensors of
        SPAN_ELEMENTS. `capture`: where those entries are, block by block, up to 1 in CAPTURE_SHARE of
        each block's entries per expert (`combine` counts its ties from them: no pass of its own)."""
        import numpy as np

        chosen = np.asarray(lo if every == 1 else [-2 if c == -2 else -1 for c in lo], dtype=np.int64)
        if (chosen >= 0).any():
            if self.span_counted:
                self.span[:] = 0
            self.span_counted = True
        n_exp = self.hist.shape[1]
        self.captured = {}
        for rows in blocks:
            base, experts = inputs(rows)
            bits = _stored_bits([base, *experts])
            cap = -(-base.numel() // (self.parts * CAPTURE_SHARE)) if capture and (chosen >= 0).any() else 0
            at = np.empty((self.parts, n_exp, cap), dtype=np.int32)
            code = np.empty((self.parts, n_exp, cap), dtype=np.int32)
            found = np.zeros((self.parts, n_exp), dtype=np.int64)
            _threads()
            _load()._histogram_span_bf16(bits[1:], bits[0], chosen, every, self.hist, self.span, self.parts, at, code,
                                         found)  # fmt: skip
            if cap:
                self.captured[rows] = (list(lo), at, code, found)
        high = torch.from_numpy(self.hist.sum(axis=0))
        self.hist[:] = 0
        return high

    def captured_ties(self, rows, bounds, modes, n: int):
        """(ties, modes left): ties[i, b, p + 1] for `combine` (as _tie_counts_bf16 counts them over its
        pieces of a block of n entries) of each COUNT bound that count_span's capture of block `rows`
        holds whole, and the modes with those bounds' COUNT taken out (the rest: a pass counts them;
        not captured, past the capture's size, or the bound outside the span)."""
        import numpy as np

        from .fused_kernels import COUNT, NONE

        ties = np.zeros((len(modes), 2, self.pieces + 1), dtype=np.int64)
        if rows not in self.captured:
            return ties, modes
        lo, at, code, found = self.captured[rows]
        step = (n + self.pieces - 1) // self.pieces
        left = modes.copy()
        for i in range(len(lo)):
            for b in range(2):
                d = (int(bounds[i, b]) >> 16) - lo[i]
                if modes[i, b] != COUNT or lo[i] < 0 or not 0 <= d < SPAN or (found[:, i] > at.shape[2]).any():
                    continue
                where = np.concatenate([at[p, i, : found[p, i]] for p in range(self.parts)])
                match = np.concatenate([code[p, i, : found[p, i]] for p in range(self.parts)])
                hits = where[match == (d << 16) | (int(bounds[i, b]) & 0xFFFF)]
                ties[i, b, 1:] = np.bincount(hits // step, minlength=self.pieces)[: self.pieces]
                left[i, b] = NONE  # for the pass only: combine keeps modes[i, b]
        return ties, left

    def span_low(self, i: int, d: int) -> torch.Tensor:
        """The last count_span's low bits of expert i's bin lo[i] + d, summed over the parts."""
        import numpy as np

        return torch.from_numpy(self.span[:, i, d].sum(axis=0, dtype=np.int64))

    def combine(self, experts: list[torch.Tensor], base: torch.Tensor, bounds: list[tuple[int, int]],
                windows: list[tuple[tuple[int, int], tuple[int, int]]], equals: list[tuple[int, int]],
                seen: list[list[int]], weights, consensus: str, normalize: bool, lambda_: float,
                into: torch.Tensor | None = None, rows=None) -> torch.Tensor:  # fmt: skip
        """W₀ + λ·combine of the sparsified, weighted task vectors of one block (float32, or bf16 as
        _rounded says). Expert i
        keeps the magnitudes whose bit patterns lie strictly between bounds[i] (low, high), and of
        the equals[i][b] entries tied at bound b those whose index among them lies in windows[i][b]
        (= [lo, hi)); seen[i][b], its ties before this block, is advanced past it. Ties are counted
        only where that decides something (a window that neither holds every tie nor is past)."""
        import numpy as np

        from .fused_kernels import ALL, COUNT, NONE

        bits = _stored_bits([base, *experts])
        n = len(experts)
        modes = np.zeros((n, 2), dtype=np.int64)
        for i in range(n):
            for b in range(2):
                (lo, hi), equal, done = windows[i][b], equals[i][b], seen[i][b]
                if hi <= lo or done >= hi:
                    modes[i, b] = NONE
                elif lo <= 0 and hi >= equal:
                    modes[i, b] = ALL
                else:
                    modes[i, b] = COUNT
        bound = np.asarray(bounds, dtype=np.int64)
        _threads()
        ties, left = self.captured_ties(rows, bound, modes, base.numel())
        if (left == COUNT).any():
            _load()._tie_counts_bf16(bits[1:], bits[0], bound, left, ties, self.pieces)
        starts = np.cumsum(ties, axis=2) + np.asarray(seen, dtype=np.int64)[:, :, None]
        for i in range(n):
            for b in range(2):
                if modes[i, b] == COUNT:
                    seen[i][b] = int(starts[i, b, -1])
        window, start = np.asarray(windows, dtype=np.int64), np.ascontiguousarray(starts[:, :, :-1])
        args = _combine_args(weights, consensus, normalize, lambda_)
        return _rounded(
            lambda out, out16: _load()._window_combine_bf16(bits[1:], bits[0], out, out16, bound, window, modes,
                                                            start, *args, self.pieces),
            base.shape, into,
        )  # fmt: skip

    def disjoint(self, experts: list[torch.Tensor], base: torch.Tensor, bounds: list[int], weights, mean: bool,
                 lambda_: float) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
        """ties' trim (magnitudes whose bit patterns are at least bounds[i] kept), weights and
        disjoint merge of one block, as `disjoint` returns them: (W₀ + λ·merged in float32, the
        undecided entries' mask, Σ sign)."""
        import numpy as np

        bits = _stored_bits([base, *experts])
        out = torch.empty(base.shape, dtype=torch.float32)
        undecided = torch.empty(base.shape, dtype=torch.bool)
        _threads()
        balance = _load()._magnitude_disjoint_bf16(
            bits[1:], bits[0], _flat(out), undecided.view(-1).numpy(), np.asarray(bounds, dtype=np.int64),
            np.asarray(weights, dtype=np.float32), mean, float(lambda_), self.pieces,
        )  # fmt: skip
        return out, undecided, int(balance)
