"""The numba kernels behind math/fused.py (imported only when numba is installed and a kernel is
first needed; see fused.py for what each repeats of torch's code and why the bytes are the same)."""

import math
import os
import sys

import numba
import numpy as np


if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # On Linux, GNU OpenMP first where numba can load it: its parallel regions resolve to the OpenMP
    # runtime torch loaded, so the kernels and torch share one pool of threads (DARE-TIES 0.89-0.91
    # of the wall time on numba's own pool, warm; bench/results/README.md, "Round twelve"); it sets
    # the thread count torch reads, which fused._threads restores. Elsewhere numba's own pool: a
    # second LLVM or Intel OpenMP runtime beside torch's may abort the process (OMP error #15).
    on_linux = sys.platform.startswith("linux")
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"] if on_linux else ["workqueue", "omp", "tbb"]
_jit = numba.njit(parallel=True, cache=True, nogil=True)


# A parallel kernel's own array expressions (np.zeros, +=, .sum()) would each be a parallel region,
# handed out entry by entry under the chunk size of 1 that math/fused.py sets: these are compiled
# apart (not parallel), so that only the kernels' prange loops run in parallel.
@numba.njit(cache=True, nogil=True)
def _zeros(shape):  # pragma: no cover - compiled
    return np.zeros(shape, dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def _total(values):  # pragma: no cover - compiled
    return values.sum()


@_jit
def _histogram(values, chosen, hist_out, parts_n):  # pragma: no cover - compiled
    """chosen < 0: hist_out += counts of the high 16 bits of |v|; else of the low 16 bits of the
    |v| whose high bits are `chosen`. One private histogram per part (one part per thread) over a
    contiguous range (integer counts: the sum does not depend on how the entries were split)."""
    n = values.size
    parts = _zeros((parts_n, 1 << 16))
    bits = values.view(np.int32)
    step = (n + parts_n - 1) // parts_n
    for p in numba.prange(parts_n):
        h = parts[p]
        part = bits[p * step : min(n, (p + 1) * step)]
        if chosen < 0:
            for j in range(part.size):
                h[(part[j] & 0x7FFFFFFF) >> 16] += 1
        else:
            for j in range(part.size):
                b = part[j] & 0x7FFFFFFF
                if (b >> 16) == chosen:
                    h[b & 0xFFFF] += 1
    for p in range(parts_n):
        for b in range(1 << 16):
            hist_out[b] += parts[p, b]


@_jit
def _mask_magnitude(values, bound, lo, hi, seen_before, weight, parts_n):  # pragma: no cover - compiled
    """values ← values·keep·weight, keep = |v| above `bound` (a finite float32) or NaN (the bit
    order fused.py states), or the tie at it whose row-major index among all ties (counting
    `seen_before` earlier ones) is in [lo, hi). Returns the ties seen here. Parts of contiguous
    entries: their ties are counted, a prefix sum gives each part its first tie's index, then
    each part masks its entries."""
    n = values.size
    step = (n + parts_n - 1) // parts_n
    ties = _zeros(parts_n + 1)
    for p in numba.prange(parts_n):
        t = 0
        part = values[p * step : min(n, (p + 1) * step)]
        for j in range(part.size):
            t += abs(part[j]) == bound
        ties[p + 1] = t
    for p in range(parts_n):
        ties[p + 1] += ties[p]
    w = np.float32(weight)
    one, zero = np.float32(1.0), np.float32(0.0)
    for p in numba.prange(parts_n):
        tie = seen_before + ties[p]
        part = values[p * step : min(n, (p + 1) * step)]
        for j in range(part.size):
            v = part[j]
            a = abs(v)
            keep = np.float32((a > bound) | (a != a))  # no branch: half the entries go each way
            if a == bound:
                keep = one if lo <= tie < hi else zero
                tie += 1
            part[j] = (v * keep) * w
    return ties[parts_n]


@numba.njit(cache=True)
def _sign(x):  # pragma: no cover - compiled; as torch.sign: ±1, and +0 for ±0 and for NaN (no branch)
    return np.float32(x > 0) - np.float32(x < 0)


WIDEN = 2048  # entries at a time in the row-wise kernels (their buffers stay in the L1/L2 cache)

# The row-wise helpers index slices from 0 (`src = stored[j0 : j0 + m]`, then src[k]), never
# stored[j0 + k]: numba wraps a signed index that may be negative (x[-1] is the last entry), and
# that select on every access keeps LLVM from vectorising the loop; k from range(m) is known not to
# be. The same arithmetic: task arithmetic's kernel 3.27 -> 1.94 ns per entry (bench/dare_kernels.py;
# bench/results/README.md, "Round eleven").


@numba.njit(inline="always")
def _widen(stored, j0, m, row):  # pragma: no cover - compiled
    """row[k] = the float32 bits of bf16 stored[j0 + k], k < m: exact, the bits shifted up by 16, as
    torch converts."""
    src = stored[j0 : j0 + m]
    for k in range(m):
        row[k] = np.uint32(src[k]) << np.uint32(16)


@numba.njit(inline="always")
def _mixed_rows(vectors, v0, base, b0, m, out, j0, mixed, scratch, weights, consensus, normalize, divisor_none,
                lam, lam32):  # pragma: no cover - compiled  # fmt: skip
    """gta.combine of m entries: out[j0 + k] = W₀ + λ·(normalised) Σ vectors[i][v0 + k] with the
    consensus mask (0 none, 1 sum, 2 count), W₀ = base[b0 + k]; torch's operations in its order per
    entry, each step a loop over the m entries (vectorised). `mixed`, `scratch`: buffers of WIDEN."""
    n_exp = len(weights)
    one, zero = np.float32(1.0), np.float32(0.0)
    for k in range(m):
        mixed[k] = zero
    if consensus == 0:
        for i in range(n_exp):
            v = vectors[i][v0 : v0 + m]
            for k in range(m):
                mixed[k] += v[k]
        if normalize:
            for k in range(m):
                mixed[k] = mixed[k] / divisor_none
    else:
        for i in range(n_exp):
            v = vectors[i][v0 : v0 + m]
            if consensus == 1:
                for k in range(m):
                    mixed[k] += v[k]
            else:
                for k in range(m):
                    mixed[k] += _sign(v[k])
        majority = scratch[0]
        divisor = scratch[1]
        for k in range(m):
            majority[k] = np.float32(mixed[k] >= 0) * np.float32(2.0) - one  # NaN: −1, as torch.where
            mixed[k] = zero
            divisor[k] = zero
        for i in range(n_exp):
            v = vectors[i][v0 : v0 + m]
            w = weights[i]
            for k in range(m):
                agree = np.float32(_sign(v[k]) == majority[k])
                mixed[k] += v[k] * agree
                divisor[k] += agree * w
        for k in range(m):
            divisor[k] += np.float32(divisor[k] == 0)  # 0 (or −0) → 1, as masked_fill
        if normalize:
            for k in range(m):
                mixed[k] = mixed[k] / divisor[k]
    if lam != 1:
        for k in range(m):
            mixed[k] = mixed[k] * lam32
    dest, w0 = out[j0 : j0 + m], base[b0 : b0 + m]
    for k in range(m):
        dest[k] = mixed[k] + w0[k]


@numba.njit(inline="always")
def _store(row, m, out, out16, j0):  # pragma: no cover - compiled
    """out[j0 + k] ← row[k] (float32), k < m; or where out16 is given (size > 0), out16[j0 + k] ← row[k]
    rounded to bf16 as torch rounds finite values (to nearest, ties to even), which saves a float32
    result and a pass to convert it. Returns how many were not finite, in float32 or once rounded:
    the caller leaves those to torch (its NaN bits depend on its code path, and the result's check
    sees float32 values)."""
    if out16.size == 0:
        dest = out[j0 : j0 + m]
        for k in range(m):
            dest[k] = row[k]
        return 0
    bits = row.view(np.uint32)
    dest16 = out16[j0 : j0 + m]
    bad = 0
    for k in range(m):
        b = np.int64(bits[k])
        h = (b + ((b >> 16) & 1) + 0x7FFF) >> 16
        dest16[k] = np.uint16(h & 0xFFFF)
        bad += ((b & 0x7F800000) == 0x7F800000) | ((h & 0x7F80) == 0x7F80)
    return bad


@numba.njit(inline="always")
def _disjoint_rows(vectors, v0, base, b0, m, out, undecided, j0, total, sign, count, mean,
                   lam32):  # pragma: no cover - compiled  # fmt: skip
    """ties.DisjointMerge.block of m entries (vectors[i][v0 + k], W₀ = base[b0 + k]): the elected
    sign (+1 where the sum is 0), the agreeing entries' sum (÷ their count for the mean), W₀ +
    λ·that into out[j0 + k]; undecided[j0 + k] where the sum was exactly 0 with some expert agreeing
    (the caller computes those entries' −1 value). Each step a loop over the m entries; returns
    Σ sign(elected sum) of them."""
    n_exp = len(vectors)
    one, zero = np.float32(1.0), np.float32(0.0)
    balance = 0
    dest, flag, w0 = out[j0 : j0 + m], undecided[j0 : j0 + m], base[b0 : b0 + m]
    for k in range(m):
        total[k] = zero
    for i in range(n_exp):
        v = vectors[i][v0 : v0 + m]
        for k in range(m):
            total[k] += v[k]
    for k in range(m):
        s = _sign(total[k])
        balance += np.int64(s)
        sign[k] = s + np.float32(s == 0)
        flag[k] = s == 0
        total[k] = zero
        count[k] = zero
    for i in range(n_exp):
        v = vectors[i][v0 : v0 + m]
        for k in range(m):
            x = v[k]
            agree = np.float32((_sign(x) == sign[k]) & (x != 0))
            total[k] += x * agree
            count[k] += agree
    for k in range(m):
        flag[k] = flag[k] & (count[k] > 0)
        t = total[k]
        if mean:
            t = t / max(count[k], one)
        dest[k] = w0[k] + lam32 * t
    return balance


@_jit
def _combine(vectors, base, out, weights, consensus, normalize, divisor_none, lam, parts_n):  # pragma: no cover
    """gta.combine of float32 vectors: contiguous parts, one per thread, in WIDEN entries at a time."""
    n = base.size
    step = (n + parts_n - 1) // parts_n
    lam32 = np.float32(lam)
    for p in numba.prange(parts_n):
        mixed = np.empty(WIDEN, dtype=np.float32)
        scratch = np.empty((2, WIDEN), dtype=np.float32)
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _mixed_rows(vectors, j0, base, j0, m, out, j0, mixed, scratch, weights, consensus, normalize,
                        divisor_none, lam, lam32)  # fmt: skip


@_jit
def _disjoint(vectors, base, out, undecided, mean, lam, parts_n):  # pragma: no cover - compiled
    """ties.DisjointMerge.block of float32 vectors (_disjoint_rows); returns Σ sign(elected sum)
    (the tensor's majority, an exact integer)."""
    n = base.size
    step = (n + parts_n - 1) // parts_n
    balances = _zeros(parts_n)
    lam32 = np.float32(lam)
    for p in numba.prange(parts_n):
        total = np.empty(WIDEN, dtype=np.float32)
        sign = np.empty(WIDEN, dtype=np.float32)
        count = np.empty(WIDEN, dtype=np.float32)
        balance = 0
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            balance += _disjoint_rows(vectors, j0, base, j0, m, out, undecided, j0, total, sign, count, mean, lam32)
        balances[p] = balance
    return _total(balances)


@numba.njit(inline="always")
def _task_vector_bits(expert, j0, m, w0, tau_bits, tau):  # pragma: no cover - compiled
    """tau[k] = expert's entry j0 + k, widened (_widen into tau_bits, tau's bits), − w0[k], k < m: τ
    in float32 as torch subtracts."""
    _widen(expert, j0, m, tau_bits)
    for k in range(m):
        tau[k] = tau[k] - w0[k]


@_jit
def _histogram_low_bf16(experts, base, chosen, parts_hist, parts_n):  # pragma: no cover - compiled
    """The low 16 bits of the magnitudes |W_i − W₀| (widened from the bf16 tensors as stored) whose
    high 16 bits are chosen[i] (< 0: expert i skipped), counted into parts_hist[part, i], which the
    caller sums (integers: the split does not change the totals). The high bits: _histogram_span_bf16."""
    n_exp = len(experts)
    n = base.size
    step = (n + parts_n - 1) // parts_n
    for p in numba.prange(parts_n):
        bits = np.empty((2, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[0])
            for i in range(n_exp):
                c = chosen[i]
                if c < 0:
                    continue
                h = parts_hist[p, i]
                _task_vector_bits(experts[i], j0, m, wide[0], bits[1], wide[1])
                for k in range(m):
                    b = _magnitude_of(bits[1, k])
                    if (b >> 16) == c:
                        h[b & 0xFFFF] += 1


@_jit
def _histogram_span_bf16(experts, base, lo, every, parts_hist, parts_span, parts_n, cap_at, cap_code,
                         cap_n):  # pragma: no cover - compiled  # fmt: skip
    """The high 16 bits of every magnitude |W_i − W₀| (widened from the bf16 tensors as stored; lo[i]
    −2 skips expert i) counted into parts_hist[part, i] and,
    in the same pass, where lo[i] ≥ 0, the low 16 bits of those whose high bits lie in [lo[i],
    lo[i] + span): parts_span[part, i, high − lo[i]]; those entries' indices and codes ((high −
    lo[i]) << 16 | low) go to cap_at and cap_code[part, i, c] while c < their size, and cap_n[part, i]
    counts them all (more than the size: not all kept). `every` > 1: only every `every`-th run of
    WIDEN entries of each part (a sample; no span then)."""
    cap = cap_at.shape[2]
    n_exp = len(experts)
    n = base.size
    width = parts_span.shape[2]
    step = (n + parts_n - 1) // parts_n
    for p in numba.prange(parts_n):
        bits = np.empty((2, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        tau_bits = bits[1]
        end = min(n, (p + 1) * step)
        for run, j0 in enumerate(range(p * step, end, WIDEN)):
            if run % every != 0:
                continue
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[0])
            for i in range(n_exp):
                first = lo[i]
                if first == -2:
                    continue
                h = parts_hist[p, i]
                _task_vector_bits(experts[i], j0, m, wide[0], tau_bits, wide[1])
                if first < 0:
                    for k in range(m):
                        h[_magnitude_of(tau_bits[k]) >> 16] += 1
                else:
                    span = parts_span[p, i]
                    at, codes = cap_at[p, i], cap_code[p, i]
                    c = cap_n[p, i]
                    for k in range(m):
                        b = _magnitude_of(tau_bits[k])
                        h[b >> 16] += 1
                        d = (b >> 16) - first
                        if np.uint64(d) < np.uint64(width):  # 0 <= d < width in one comparison
                            span[d, b & 0xFFFF] += 1
                            if c < cap:
                                at[c] = j0 + k
                                codes[c] = (d << 16) | (b & 0xFFFF)
                            c += 1
                    cap_n[p, i] = c


NONE, ALL, COUNT = 0, 1, 2  # which ties at a bound a block keeps: none, every one, by their index


@numba.njit(inline="always")
def _magnitude_of(bits):  # pragma: no cover - compiled
    """|x|'s float32 bit pattern, from x's: ordered like the magnitudes (NaN above ∞), as int64."""
    return np.int64(bits & np.uint32(0x7FFFFFFF))


@_jit
def _tie_counts_bf16(experts, base, bounds, modes, ties, parts_n):  # pragma: no cover - compiled
    """ties[i, b, p + 1] = how many |W_i − W₀| in part p have the bit pattern bounds[i, b], for the
    (expert, bound) pairs whose modes[i, b] is COUNT."""
    n_exp = len(experts)
    n = base.size
    step = (n + parts_n - 1) // parts_n
    for p in numba.prange(parts_n):
        bits = np.empty((2, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[0])
            for i in range(n_exp):
                if modes[i, 0] != COUNT and modes[i, 1] != COUNT:
                    continue
                _task_vector_bits(experts[i], j0, m, wide[0], bits[1], wide[1])
                for b in range(2):
                    if modes[i, b] == COUNT:
                        bound = bounds[i, b]
                        t = 0
                        for k in range(m):
                            t += _magnitude_of(bits[1, k]) == bound
                        ties[i, b, p + 1] += t


@_jit
def _window_combine_bf16(experts, base, out, out16, bounds, windows, modes, starts, weights, consensus, normalize,
                         divisor_none, lam, parts_n):  # pragma: no cover - compiled  # fmt: skip
    """gta's magnitude sparsifiers and then combine, of bf16 tensors as stored, in one pass: τ_i
    widened as _random_combine_bf16 does; its magnitude's bit pattern a kept where bounds[i, 0] < a <
    bounds[i, 1], and where a ties bound b, by modes[i, b]: NONE, ALL, or COUNT: kept if its index
    among those ties, counted from starts[i, b, p] at part p's first entry, lies in windows[i, b]
    (= [lo, hi)). Then v_i = (τ_i·keep)·w_i and combine's arithmetic (_mixed_rows). magnitude:
    (bound, 2³², window [0, k − above)); magnitude_outliers: both bounds with their windows; none:
    (−1, 2³²). Where a chunk's ties at both bounds all go one way, one loop without a branch
    (vectorised); the chunk a cut falls in goes in order. The result goes to out, or rounded to out16
    (_store); returns the count _store returns."""
    n_exp = len(experts)
    n = base.size
    step = (n + parts_n - 1) // parts_n
    lam32 = np.float32(lam)
    bad = _zeros(parts_n)
    for p in numba.prange(parts_n):
        bits = np.empty((n_exp + 1, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        w0 = wide[n_exp]
        mixed = np.empty(WIDEN, dtype=np.float32)
        scratch = np.empty((2, WIDEN), dtype=np.float32)
        tie = starts[:, :, p].copy()
        state = np.empty(2, dtype=np.int64)
        counts = np.empty(2, dtype=np.int64)
        out_row = np.empty(WIDEN, dtype=np.float32)
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[n_exp])
            for i in range(n_exp):
                row = bits[i]
                _widen(experts[i], j0, m, row)
                v = wide[i]
                for k in range(m):
                    v[k] = v[k] - w0[k]  # τ_i; row now holds its bits
                lo_bound, hi_bound = bounds[i, 0], bounds[i, 1]
                settled = True
                for b in range(2):
                    state[b] = modes[i, b]
                    counts[b] = 0
                    if state[b] == COUNT:
                        bound = bounds[i, b]
                        c = 0
                        for k in range(m):
                            c += _magnitude_of(row[k]) == bound
                        counts[b] = c
                        t = tie[i, b]
                        if t >= windows[i, b, 1] or t + c <= windows[i, b, 0]:
                            state[b] = NONE
                        elif t >= windows[i, b, 0] and t + c <= windows[i, b, 1]:
                            state[b] = ALL
                        else:
                            settled = False
                w = weights[i]
                if settled:
                    tie[i, 0] += counts[0]
                    tie[i, 1] += counts[1]
                    keep_lo, keep_hi = state[0] == ALL, state[1] == ALL
                    for k in range(m):
                        a = _magnitude_of(row[k])
                        keep = np.float32(
                            ((a > lo_bound) & (a < hi_bound))
                            | ((a == lo_bound) & keep_lo)
                            | ((a == hi_bound) & (hi_bound != lo_bound) & keep_hi)
                        )
                        v[k] = (v[k] * keep) * w
                else:
                    t_lo, t_hi = tie[i, 0], tie[i, 1]
                    for k in range(m):
                        a = _magnitude_of(row[k])
                        keep = np.float32((a > lo_bound) & (a < hi_bound))
                        if a == lo_bound:
                            keep = np.float32(windows[i, 0, 0] <= t_lo < windows[i, 0, 1])
                            t_lo += 1
                        elif a == hi_bound:
                            keep = np.float32(windows[i, 1, 0] <= t_hi < windows[i, 1, 1])
                            t_hi += 1
                        v[k] = (v[k] * keep) * w
                    tie[i, 0], tie[i, 1] = t_lo, t_hi
            _mixed_rows(wide, 0, w0, 0, m, out_row, 0, mixed, scratch, weights, consensus, normalize,
                        divisor_none, lam, lam32)  # fmt: skip
            bad[p] += _store(out_row, m, out, out16, j0)
    return _total(bad)


@_jit
def _magnitude_disjoint_bf16(experts, base, out, undecided, bounds, weights, mean, lam, parts_n):  # pragma: no cover
    """ties.merge of bf16 tensors as stored, in one pass: τ_i widened (_widen), kept where its
    magnitude's bit pattern is at least bounds[i] (ties.trim: every tie kept, NaN kept), times w_i,
    then _disjoint_rows. Returns Σ sign(elected sum)."""
    n_exp = len(experts)
    n = base.size
    step = (n + parts_n - 1) // parts_n
    balances = _zeros(parts_n)
    lam32 = np.float32(lam)
    for p in numba.prange(parts_n):
        bits = np.empty((n_exp + 1, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        w0 = wide[n_exp]
        vectors = wide[:n_exp]
        total = np.empty(WIDEN, dtype=np.float32)
        sign = np.empty(WIDEN, dtype=np.float32)
        count = np.empty(WIDEN, dtype=np.float32)
        balance = 0
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[n_exp])
            for i in range(n_exp):
                row = bits[i]
                _widen(experts[i], j0, m, row)
                v = wide[i]
                w = weights[i]
                bound = bounds[i]
                for k in range(m):
                    v[k] = v[k] - w0[k]  # τ_i; row now holds its bits
                for k in range(m):
                    v[k] = (v[k] * np.float32(_magnitude_of(row[k]) >= bound)) * w
            balance += _disjoint_rows(vectors, 0, w0, 0, m, out, undecided, j0, total, sign, count, mean, lam32)
        balances[p] = balance
    return _total(balances)


# torch's CPU `rand` (float32): the low 24 bits of successive MT19937 outputs times 2⁻²⁴ (math/fused.py
# TorchRand says how this is checked against torch)
MT_N, MT_M = 624, 397


@numba.njit(inline="always")
def _mt_twist(mt):  # pragma: no cover - compiled
    """The next 624 words of the state (the reference's generate step)."""
    for i in range(MT_N - MT_M):
        y = (mt[i] & np.uint32(0x80000000)) | (mt[i + 1] & np.uint32(0x7FFFFFFF))
        mt[i] = mt[i + MT_M] ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(0x9908B0DF))
    for i in range(MT_N - MT_M, MT_N - 1):
        y = (mt[i] & np.uint32(0x80000000)) | (mt[i + 1] & np.uint32(0x7FFFFFFF))
        mt[i] = mt[i + MT_M - MT_N] ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(0x9908B0DF))
    y = (mt[MT_N - 1] & np.uint32(0x80000000)) | (mt[0] & np.uint32(0x7FFFFFFF))
    mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(0x9908B0DF))


@numba.njit(inline="always")
def _mt_low24(word):  # pragma: no cover - compiled
    """The tempered output's low 24 bits."""
    y = word ^ (word >> np.uint32(11))
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y & np.uint32(0xFFFFFF)


@numba.njit(cache=True, nogil=True)
def _mt_seed(seed, mt):  # pragma: no cover - compiled
    """mt ← the state MT19937 seeds from a 32-bit `seed` (init_genrand, as torch's manual_seed)."""
    mt[0] = np.uint32(seed)
    for i in range(1, MT_N):
        prev = np.uint64(mt[i - 1])
        mt[i] = np.uint32(
            (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(i)) & np.uint64(0xFFFFFFFF)
        )


@numba.njit(cache=True, nogil=True)
def _mt_uniform(mt, pos, out):  # pragma: no cover - compiled
    """out ← the next out.size draws of torch.rand (float32); returns the new position in the state."""
    n = out.size
    scale = np.float32(2.0**-24)
    j = 0
    while j < n:
        if pos == MT_N:
            _mt_twist(mt)
            pos = 0
        m = min(MT_N - pos, n - j)
        words, dest = mt[pos : pos + m], out[j : j + m]
        for k in range(m):
            dest[k] = np.float32(_mt_low24(words[k])) * scale
        j += m
        pos += m
    return pos


# math/exact_sum.py's accumulator: FLOAT32_BINS mantissa sums of float32 magnitudes by biased exponent
# (then bins that are non-zero where an entry was ∞ or NaN), then FLOAT64_BINS of float64 chunk sums
FLOAT32_BINS = 257
FLOAT64_BINS = 2048
EXACT_BINS = FLOAT32_BINS + FLOAT64_BINS
LANES = 4  # accumulators used in turn, so that consecutive entries of one exponent do not wait on each other
CHUNK = 1024  # entries summed in float64 at a time


@numba.njit(inline="always")
def _exact_add(acc, lane, b):  # pragma: no cover - compiled
    """acc[lane] += |x| for x with bit pattern b: its integer mantissa (implicit bit included) under
    its biased exponent; ∞ adds to bin 255, NaN to 256 (no branch: either way is common)."""
    b &= np.uint32(0x7FFFFFFF)
    e = b >> np.uint32(23)
    m = b & np.uint32(0x7FFFFF)
    acc[lane, e + ((e == 255) & (m != 0))] += m | (np.uint32(e != 0) << np.uint32(23))


@numba.njit(inline="always")
def _exact_add64(acc, s):  # pragma: no cover - compiled
    """acc[FLOAT32_BINS + E] += the 53-bit integer mantissa of s (a positive, normal float64 with
    biased exponent E); a bin nearing 2⁶³ carries its high bits 10 exponents up (value kept)."""
    fraction, exponent = math.frexp(s)  # s = fraction·2^exponent, fraction in [1/2, 1)
    e = np.int64(exponent) + 1022
    acc[FLOAT32_BINS + e] += np.int64(fraction * 9007199254740992.0)  # ·2⁵³: exact
    _carry(acc, e)


@numba.njit(inline="always")
def _carry(acc, e):  # pragma: no cover - compiled
    """Keep float64 bin e (and those it carries into) below 2⁶²: its bits above the tenth move to the
    bin 10 exponents up, which holds them at the same value."""
    while acc[FLOAT32_BINS + e] >= np.int64(1) << 62:
        acc[FLOAT32_BINS + e + 10] += acc[FLOAT32_BINS + e] >> 10
        acc[FLOAT32_BINS + e] &= 1023
        e += 10


@numba.njit(inline="always")
def _plain_sum(values, m):  # pragma: no cover - compiled
    """Σ|values[:m]| in float64, eight sums at a time (vectorised)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    j = 0
    while j + 8 <= m:
        s0 += np.float64(abs(values[j]))
        s1 += np.float64(abs(values[j + 1]))
        s2 += np.float64(abs(values[j + 2]))
        s3 += np.float64(abs(values[j + 3]))
        s4 += np.float64(abs(values[j + 4]))
        s5 += np.float64(abs(values[j + 5]))
        s6 += np.float64(abs(values[j + 6]))
        s7 += np.float64(abs(values[j + 7]))
        j += 8
    while j < m:
        s0 += np.float64(abs(values[j]))
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(inline="always")
def _chunk_sum(values, bits, j0, j1):  # pragma: no cover - compiled
    """(Σ|values[j0:j1]| in float64 (_plain_sum); the least non-zero and the largest magnitude bit
    pattern, the least found less one, where 0 − 1 wraps to the largest: no branch)."""
    least = np.uint64(0xFFFFFFFFFFFFFFFF)
    most = np.uint64(0)
    chunk = bits[j0:j1]
    for j in range(j1 - j0):
        b = np.uint64(chunk[j] & np.uint32(0x7FFFFFFF))
        least = min(least, b - np.uint64(1))
        most = max(most, b)
    return _plain_sum(values[j0:j1], j1 - j0), least + np.uint64(1), most


@numba.njit(inline="always")
def _sum_is_exact(total, least, most):  # pragma: no cover - compiled
    """Whether a float64 sum of magnitudes, `total`, is exact in any order: finite entries (most below
    ∞'s pattern) and total below 2⁵³ units of the last place of the least non-zero one (every
    partial sum is then a representable multiple of that unit)."""
    e = max(np.int64(least >> np.uint64(23)), 1)
    return most < np.uint64(0x7F800000) and total < math.ldexp(1.0, e - 150 + 53)


@numba.njit(inline="always")
def _exact_chunk(values, bits, j0, j1, acc, lanes):  # pragma: no cover - compiled
    """acc += Σ|values[j0:j1]| (a chunk of at most CHUNK entries) summed in float64 in any order,
    which is exact when the total is below 2⁵³ units of the last place of the chunk's least
    non-zero magnitude (every partial sum is then a representable multiple of it): almost every
    chunk of task-vector entries. Other chunks, and any with ∞ or NaN, go entry by entry into
    the float32 bins (`lanes`, added to acc by the caller)."""
    total, least, most = _chunk_sum(values, bits, j0, j1)
    if most == 0:
        return
    if _sum_is_exact(total, least, most):
        _exact_add64(acc, total)
    else:
        for j in range(j0, j1):
            _exact_add(lanes, j & (LANES - 1), bits[j])


@numba.njit(inline="always")
def _exact_merge(parts, lanes, acc):  # pragma: no cover - compiled
    """acc += every part's accumulator and float32 lanes, each bin below 2⁶² before and after (no
    sum overflows)."""
    for p in range(parts.shape[0]):  # loops, not array expressions: in a parallel kernel each of
        # those would be a parallel region of its own (hundreds per call, each waking the pool)
        for lane in range(LANES):
            for e in range(FLOAT32_BINS):
                parts[p, e] += lanes[p, lane, e]
        for e in range(EXACT_BINS):
            acc[e] += parts[p, e]
        for e in range(FLOAT64_BINS - 10):
            _carry(acc, e)


@_jit
def _exact_abs_sum(values, acc, parts_n):  # pragma: no cover - compiled
    """acc (EXACT_BINS,) += the exact_sum accumulator of float32 `values`, by chunks (_exact_chunk),
    in parts, one per thread: integer sums, so the split changes nothing."""
    n = values.size
    bits = values.view(np.uint32)
    chunks = (n + CHUNK - 1) // CHUNK
    step = (chunks + parts_n - 1) // parts_n
    parts = _zeros((parts_n, EXACT_BINS))
    lanes = _zeros((parts_n, LANES, FLOAT32_BINS))
    for p in numba.prange(parts_n):
        for c in range(p * step, min(chunks, (p + 1) * step)):
            _exact_chunk(values, bits, c * CHUNK, min(n, (c + 1) * CHUNK), parts[p], lanes[p])
    _exact_merge(parts, lanes, acc)


@numba.njit(cache=True, nogil=True)
def _mt_keep(values, mt, pos, threshold, keep_if_below):  # pragma: no cover - compiled
    """values ← values·keep in place, keep = (the next draw's low 24 bits < threshold) == keep_if_below,
    one draw per entry in order: torch's `tau.mul_(torch.rand(...) < density)` (or `>= p`) for
    threshold = ceil(float32(density)·2²⁴). Returns the new position in the state."""
    n = values.size
    keep = np.empty(MT_N, dtype=np.float32)
    j = 0
    while j < n:
        if pos == MT_N:
            _mt_twist(mt)
            pos = 0
        m = min(MT_N - pos, n - j)
        words, dest = mt[pos : pos + m], values[j : j + m]
        for k in range(m):
            keep[k] = np.float32((_mt_low24(words[k]) < threshold) == keep_if_below)
        for k in range(m):
            dest[k] = dest[k] * keep[k]
        j += m
        pos += m
    return pos


@numba.njit(inline="always")
def _mt_keep_bits(mt, pos, threshold, keep_if_below, keep, bit0, n, flags):  # pragma: no cover - compiled
    """keep's bits bit0 … bit0 + n − 1 (entry j's bit: byte j >> 3, bit j & 7; zero before) ← the
    next n draws' (low 24 bits < threshold) == keep_if_below, as _mt_keep decides them. `flags`: a
    buffer of MT_N bytes. Returns the new position in the state."""
    j = 0
    while j < n:
        if pos == MT_N:
            _mt_twist(mt)
            pos = 0
        m = min(MT_N - pos, n - j)
        words = mt[pos : pos + m]
        for k in range(m):
            flags[k] = (_mt_low24(words[k]) < threshold) == keep_if_below
        k = 0
        while k < m:  # whole bytes at once where 8 flags fill one (no read-modify-write chain)
            b = bit0 + j + k
            if b & 7 == 0 and k + 8 <= m:
                keep[b >> 3] = (
                    flags[k] | (flags[k + 1] << 1) | (flags[k + 2] << 2) | (flags[k + 3] << 3)
                    | (flags[k + 4] << 4) | (flags[k + 5] << 5) | (flags[k + 6] << 6) | (flags[k + 7] << 7)
                )  # fmt: skip
                k += 8
            else:
                keep[b >> 3] |= flags[k] << (b & 7)
                k += 1
        j += m
        pos += m
    return pos


@_jit
def _mt_keep_bits_each(states, positions, thresholds, keep_if_below, keep, rows, bit0, n):  # pragma: no cover
    """_mt_keep_bits for each generator i (states[i], positions[i], updated) into keep[rows[i]]; the
    generators are independent, so one thread each (a generator's draws stay in order)."""
    for i in numba.prange(states.shape[0]):
        flags = np.empty(MT_N, dtype=np.uint8)
        positions[i] = _mt_keep_bits(states[i], positions[i], thresholds[i], keep_if_below, keep[rows[i]], bit0, n,
                                     flags)  # fmt: skip


@numba.njit(inline="always")
def _kept(keep, b):  # pragma: no cover - compiled
    return np.float32((keep[b >> 3] >> (b & 7)) & 1)


@numba.njit(inline="always")
def _unpack(keep, b0, m, out):  # pragma: no cover - compiled
    """out[k] ← keep's bit b0 + k as 0.0 or 1.0, k < m: whole bytes eight entries at a time."""
    k = 0
    while k < m and (b0 + k) & 7 != 0:
        out[k] = _kept(keep, b0 + k)
        k += 1
    whole = (m - k) >> 3
    first = (b0 + k) >> 3
    src, dest = keep[first : first + whole], out[k : k + 8 * whole]
    for q in range(whole):
        byte = src[q]
        for t in range(8):
            dest[8 * q + t] = np.float32((byte >> t) & 1)
    k += 8 * whole
    while k < m:
        out[k] = _kept(keep, b0 + k)
        k += 1


@_jit
def _random_norms_bf16(experts, base, keep, rows, bit0, before, after, parts_n):  # pragma: no cover - compiled
    """For each listed expert t (experts[rows[t]]): before[t] += the exact_sum accumulator of |τ| (τ =
    expert − base, bf16 as stored widened to float32, as torch subtracts), after[t] += that of
    |τ·keep| (keep[rows[t]]: the entries' bits from bit0, as _mt_keep_bits wrote them); by chunks,
    in parts, one per thread. A chunk's float64 sums are exact where _exact_chunk's test passes for
    |τ|, and then for |τ·keep| too (a subset of those magnitudes, with zeros); else both go entry
    by entry."""
    n = base.size
    n_listed = rows.size
    chunks = (n + CHUNK - 1) // CHUNK
    step = (chunks + parts_n - 1) // parts_n
    parts = _zeros((2, n_listed, parts_n, EXACT_BINS))
    lanes = _zeros((2, n_listed, parts_n, LANES, FLOAT32_BINS))
    for p in numba.prange(parts_n):
        buf = np.empty((4, CHUNK), dtype=np.uint32)
        wide = buf.view(np.float32)
        for c in range(p * step, min(chunks, (p + 1) * step)):
            j0 = c * CHUNK
            m = min(CHUNK, n - j0)
            _widen(base, j0, m, buf[0])
            for t in range(n_listed):
                i = rows[t]
                _widen(experts[i], j0, m, buf[1])
                _unpack(keep[i], bit0 + j0, m, wide[3])
                for k in range(m):
                    tau = wide[1, k] - wide[0, k]
                    wide[1, k] = tau
                    wide[2, k] = tau * wide[3, k]
                total, least, most = _chunk_sum(wide[1], buf[1], 0, m)
                if most == 0:
                    continue
                if _sum_is_exact(total, least, most):
                    _exact_add64(parts[0, t, p], total)
                    kept = _plain_sum(wide[2], m)
                    if kept != 0:
                        _exact_add64(parts[1, t, p], kept)
                else:
                    for k in range(m):
                        _exact_add(lanes[0, t, p], k & (LANES - 1), buf[1, k])
                        _exact_add(lanes[1, t, p], k & (LANES - 1), buf[2, k])
    for t in range(n_listed):
        _exact_merge(parts[0, t], lanes[0, t], before[t])
        _exact_merge(parts[1, t], lanes[1, t], after[t])


@_jit
def _random_combine_bf16(experts, base, out, out16, keep, bit0, masked, ratios, weights, consensus, normalize,
                         divisor_none, lam, parts_n):  # pragma: no cover - compiled  # fmt: skip
    """gta's combine of bf16 inputs as stored (their uint16 bit patterns), each widened (_widen), in
    one pass: τ_i = W_i − W₀ formed in float32 as TensorTask.task_vector forms it; where masked[i]
    (a random sparsifier), τ_i·keep (keep[i]'s bits from bit0) and then ·ratios[i] where that is not
    0 (the rescaling, float32); then v_i = ·w_i and combine's arithmetic (_mixed_rows): the
    operations of Sparsifier.apply, the weight and gta.combine, in their order. Nothing masked:
    task arithmetic and its like. The result goes to out, or rounded to out16 (_store); returns the
    count _store returns."""
    n_exp = len(experts)
    n = base.size
    step = (n + parts_n - 1) // parts_n
    lam32 = np.float32(lam)
    bad = _zeros(parts_n)
    for p in numba.prange(parts_n):
        bits = np.empty((n_exp + 1, WIDEN), dtype=np.uint32)
        wide = bits.view(np.float32)
        w0 = wide[n_exp]
        mixed = np.empty(WIDEN, dtype=np.float32)
        scratch = np.empty((2, WIDEN), dtype=np.float32)
        flags = np.empty(WIDEN, dtype=np.float32)
        row = np.empty(WIDEN, dtype=np.float32)
        end = min(n, (p + 1) * step)
        for j0 in range(p * step, end, WIDEN):
            m = min(WIDEN, end - j0)
            _widen(base, j0, m, bits[n_exp])
            for i in range(n_exp):
                _widen(experts[i], j0, m, bits[i])
                v = wide[i]
                w = weights[i]
                r = ratios[i]
                if masked[i]:
                    _unpack(keep[i], bit0 + j0, m, flags)
                if masked[i] and r != 0:
                    for k in range(m):
                        v[k] = (((v[k] - w0[k]) * flags[k]) * r) * w
                elif masked[i]:
                    for k in range(m):
                        v[k] = ((v[k] - w0[k]) * flags[k]) * w
                else:
                    for k in range(m):
                        v[k] = (v[k] - w0[k]) * w
            _mixed_rows(wide, 0, w0, 0, m, row, 0, mixed, scratch, weights, consensus, normalize, divisor_none,
                        lam, lam32)  # fmt: skip
            bad[p] += _store(row, m, out, out16, j0)
    return _total(bad)


_RANK_DIGITS = ((0, 11), (11, 10), (21, 10))  # (shift, width): a magnitude's 31 bits in three digits


@numba.njit(inline="always")
def _stable_order(bits, keys, order, spare, counts):  # pragma: no cover - compiled
    """The indices of one row's entries in the stable ascending sort of their magnitudes. `bits`
    are the float32 entries' bit patterns: a magnitude is the pattern without its sign (ordered as
    the values are, ±0 equal), every NaN one key above ∞ (torch sorts NaN last, NaNs equal). Least
    significant digit first, each pass a stable counting sort, so equal keys keep their index
    order: the stable sort. A digit every entry shares is skipped."""
    n = bits.size
    for j in range(n):
        k = bits[j] & 0x7FFFFFFF
        keys[j] = 0x7F800001 if k > 0x7F800000 else k
        order[j] = j
    for d in range(3):
        shift, width = _RANK_DIGITS[d]
        mask = (1 << width) - 1
        for b in range(1 << width):  # a loop: an array expression here would be a parallel region
            counts[b] = 0
        for j in range(n):
            counts[(keys[j] >> shift) & mask] += 1
        if counts[(keys[0] >> shift) & mask] == n:
            continue  # one digit for all: this pass would leave the order as it is
        total = 0
        for b in range(1 << width):
            c = counts[b]
            counts[b] = total
            total += c
        for j in range(n):
            e = order[j]
            b = (keys[e] >> shift) & mask
            spare[counts[b]] = e
            counts[b] += 1
        order, spare = spare, order
    return order


@_jit
def _della_keep(values, draws, keep_below):  # pragma: no cover - compiled
    """values[r, j] *= (draws[r, j] < keep_below[rank]) in place, rank the entry's position in its
    row's stable ascending sort of magnitudes (_stable_order); rows in parallel."""
    rows, n = values.shape
    bits = values.view(np.int32)
    for r in numba.prange(rows):
        keys = np.empty(n, dtype=np.int32)
        order = np.empty(n, dtype=np.int32)
        spare = np.empty(n, dtype=np.int32)
        counts = np.empty(1 << 11, dtype=np.int64)
        order = _stable_order(bits[r], keys, order, spare, counts)
        for p in range(n):
            e = order[p]
            values[r, e] = values[r, e] * (np.float32(1.0) if draws[r, e] < keep_below[p] else np.float32(0.0))
