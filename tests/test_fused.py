"""The fused kernels (math/fused.py, numba) give the bytes of the torch code they replace: gta's
combine for every consensus, normalisation, λ and weights (with ±0, NaN and ∞ among the inputs),
and whole gta merges for every sparsifier, whole and streamed in row blocks. Entries that are NaN
are compared as NaN (which NaN bit pattern arithmetic leaves is the instruction's choice, in
torch's vectorised code as in numba's)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from streammerge.math import fused
from streammerge.methods import gta
from streammerge.methods.base import TensorTask

pytestmark = pytest.mark.skipif(not fused.installed(), reason="numba is not installed (the `fast` extra)")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries whose bits differ, NaN against NaN counted equal."""
    differ = a.view(torch.int32) != b.view(torch.int32)
    return int((differ & ~(a.isnan() & b.isnan())).sum())


def vectors(n: int, nonfinite: bool, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 0.5, 0.3):
        v = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float() * scale  # bf16 steps: ties
        v[torch.rand(n, generator=g) < 0.4] = 0.0
        v[torch.rand(n, generator=g) < 0.05] = -0.0
        if nonfinite:
            v[torch.rand(n, generator=g) < 0.001] = float("nan")
            v[torch.rand(n, generator=g) < 0.001] = float("-inf")
        out.append(v)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    base[torch.rand(n, generator=g) < 0.02] = -0.0
    return out, base


@pytest.mark.parametrize("nonfinite", [False, True])
def test_combine_gives_torchs_bytes(nonfinite):
    vs, base = vectors(fused.MIN_ELEMENTS + 12345, nonfinite)
    for consensus, normalize, lam, weights in itertools.product(
        ("none", "sum", "count"), (False, True), (1.0, 0.7, -1.0), ((1.0, 0.5, 0.3), (1.0, -1.0, 0.0))
    ):
        params = gta.GtaParams(consensus=consensus, normalize=normalize, lambda_=lam)
        assert fused.available(base, *vs)
        ours = fused.combine([v.clone() for v in vs], weights, base.clone(), consensus, normalize, lam)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "available", lambda *t: False)
            theirs = gta.combine([v.clone() for v in vs], weights, base.clone(), params)
        assert same_bits(ours, theirs) == 0, (consensus, normalize, lam, weights)


class Rowed:
    """Experts that load row blocks, so gta streams a tensor above the block size."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i].clone()

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        return self.tensors[i][start:stop].clone()


def stored_task(base: torch.Tensor, stored: list[torch.Tensor], values: tuple) -> TensorTask:
    """A task whose inputs are also given as stored (bf16 views, as the engine gives them)."""

    def read(i, rows):
        t = base if i is None else stored[i]
        return t if rows is None else t[rows[0] : rows[1]]

    task = TensorTask("model.layers.0.mlp.up_proj.weight", base.float(), Rowed([e.float() for e in stored]),
                      (1.0, 0.7, 0.4), expert_values=values, seed=3)  # fmt: skip
    task.stored = read
    return task


def merged(params: gta.GtaParams, base, experts, values, use_fused: bool, block: int | None) -> torch.Tensor:
    task = TensorTask("model.layers.0.mlp.up_proj.weight", base.clone(), Rowed(experts), (1.0, 0.7, 0.4),
                      expert_values=values, seed=3)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        if not use_fused:
            mp.setattr(fused, "available", lambda *t: False)
        if block is not None:  # stream in row blocks: a small block size and no whole-tensor cache
            mp.setattr(gta.ties, "CACHE_BYTES", 0)
            mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
        return gta.merge(task, params)


@pytest.mark.parametrize("block", [None, 1 << 17])
@pytest.mark.parametrize(
    "sparsify,consensus,rescale,tie_break",
    [
        ("magnitude", "sum", False, "index"),
        ("magnitude", "sum", False, "mergekit"),
        ("magnitude", "none", True, "index"),
        ("magnitude_outliers", "sum", False, "index"),
        ("random", "sum", True, "index"),
        ("della_magprune", "sum", True, "index"),
        ("none", "count", False, "index"),
    ],
)
def test_gta_merges_are_byte_identical_with_the_kernels(sparsify, consensus, rescale, tie_break, block):
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16).float()
    experts = [(base + (torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16).float()) for _ in range(3)]
    values = tuple(
        {"weight": w, "density": d, "gamma": 0.01, "epsilon": 0.1} for w, d in ((1.0, 0.3), (0.7, 0.5), (0.4, 0.2))
    )
    params = gta.GtaParams(sparsify=sparsify, consensus=consensus, normalize=True, rescale=rescale, tie_break=tie_break)
    ours = merged(params, base, experts, values, True, block)
    theirs = merged(params, base, experts, values, False, block)
    assert same_bits(ours, theirs) == 0


def test_the_kernels_keep_the_earliest_tied_entries():
    """mask_magnitude keeps ties [lo, hi) in row-major order across calls (the streamed case)."""
    t = torch.tensor([0.5, -0.25, 0.25, 0.75, -0.25, 0.25] * (fused.MIN_ELEMENTS // 6 + 1))
    k = t.numel() // 2  # every 0.75 and 0.5, and the first ties at 0.25
    above = int((t.abs() > 0.25).sum())
    bound = int(torch.tensor([0.25]).view(torch.int32))
    first, second = t[: t.numel() // 3].clone(), t[t.numel() // 3 :].clone()
    seen = fused.mask_magnitude(first, bound, 0, k - above, 0, 1.0)
    fused.mask_magnitude(second, bound, 0, k - above, seen, 1.0)
    kept = torch.cat([first, second]) != 0
    ties = (t.abs() == 0.25).nonzero().squeeze(1)
    assert int(kept.sum()) == k
    assert bool(kept[ties[: k - above]].all()) and not bool(kept[ties[k - above :]].any())


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("block", [None, 1 << 17])
def test_ties_merges_are_byte_identical_with_the_kernels(merge, block):
    """Our own ties (every tie at the threshold kept, exact cancellations to the majority sign)."""
    from streammerge.methods import ties

    g = torch.Generator().manual_seed(2)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16).float()
    experts = [(base + (torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16).float()) for _ in range(3)]
    experts[1][:8] = 2 * base[:8] - experts[0][:8]  # exact cancellations: the elected sum is 0 there
    params = ties.TiesParams(density=0.4, merge=merge, lambda_=0.8)

    def run(use_fused: bool) -> torch.Tensor:
        task = TensorTask("model.layers.0.mlp.up_proj.weight", base.clone(), Rowed(experts), (1.0, 1.0, 0.5))
        with pytest.MonkeyPatch.context() as mp:
            if not use_fused:
                mp.setattr(fused, "available", lambda *t: False)
            if block is not None:
                mp.setattr(ties, "CACHE_BYTES", 0)
                mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
            return ties.merge(task, params)

    assert same_bits(run(True), run(False)) == 0


def test_the_kernels_give_the_same_bytes_on_any_thread_count():
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(512, 700, generator=g) * 0.02).to(torch.bfloat16).float()
    experts = [(base + (torch.randn(512, 700, generator=g) * 0.002).to(torch.bfloat16).float()) for _ in range(3)]
    values = tuple({"weight": 1.0, "density": 0.3} for _ in range(3))
    params = gta.GtaParams(sparsify="magnitude", consensus="sum", normalize=True)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(merged(params, base, experts, values, True, None))
    finally:
        torch.set_num_threads(threads)
    assert same_bits(outs[0], outs[1]) == 0 and same_bits(outs[0], outs[2]) == 0


@pytest.mark.parametrize("block", [None, 1 << 17])
@pytest.mark.parametrize("stored_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "consensus,normalize,lam,density", [("none", False, 0.7, 1.0), ("sum", True, 1.0, 1.0), ("none", True, -1.0, 1.5)]
)
def test_unsparsified_gta_reads_the_stored_tensors_with_the_same_bytes(consensus, normalize, lam, density, stored_dtype,
                                                                      block):  # fmt: skip
    """Task arithmetic and its like (no sparsifier) read the inputs as stored (TensorTask.stored)
    and widen bf16 in the kernel: the bytes of widening each input to float32 first, with NaN and
    ±Inf among them, whole and in row blocks, with the kernel and with torch's code."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(stored_dtype)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(stored_dtype) for _ in range(3)]
    stored[1][3, :5] = float("nan")
    stored[2][7, 2] = float("-inf")
    values = tuple({"weight": w, "density": density} for w in (1.0, 0.7, 0.4))
    params = gta.GtaParams(consensus=consensus, normalize=normalize, lambda_=lam)
    theirs = merged(params, base.float(), [e.float() for e in stored], values, True, block)

    def read(i, rows):
        t = base if i is None else stored[i]
        return (t if rows is None else t[rows[0] : rows[1]]).clone()

    for use_kernel in (True, False):
        task = TensorTask("model.layers.0.mlp.up_proj.weight", base.float(), Rowed([e.float() for e in stored]),
                          (1.0, 0.7, 0.4), expert_values=values, seed=3)  # fmt: skip
        task.stored = read
        with pytest.MonkeyPatch.context() as mp:
            if not use_kernel:
                mp.setattr(fused, "available", lambda *t, **k: False)
            if block is not None:
                mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
            ours = gta.merge(task, params)
        assert same_bits(ours, theirs) == 0, use_kernel


@pytest.mark.parametrize("block", [None, 1 << 17, 5 * 640])
@pytest.mark.parametrize(
    "sparsify,consensus,normalize,lam,densities,nonfinite",
    [
        ("magnitude", "sum", True, 1.0, (0.5, 0.5, 0.5), False),
        ("magnitude", "sum", True, 0.8, (0.3, 1.0, 0.05), True),
        ("magnitude", "none", False, 1.0, (0.2, 0.6, 0.999), False),
        ("magnitude", "count", True, -0.5, (0.4, 0.4, 0.7), True),
        ("magnitude_outliers", "none", False, 1.0, (0.5, 0.9, 0.2), False),
        ("magnitude_outliers", "sum", True, 0.7, (0.3, 1.0, 0.6), True),
    ],
)
def test_magnitude_sparsified_gta_reads_the_stored_tensors_with_the_same_bytes(
    sparsify, consensus, normalize, lam, densities, nonfinite, block
):
    """TIES, breadcrumbs and their like on bf16 inputs read as stored (gta.magnitude_stored:
    thresholds from histograms of τ widened in the kernel, then one masking and combining pass):
    the bytes of forming every τ_i in float32 first, with many ties at each threshold (bf16 steps),
    an expert left whole (density 1), NaN and ∞ among the inputs, whole and in row blocks, with the
    tie cuts falling inside a block."""
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    stored[0][10:20] = base[10:20]  # τ = 0 over whole rows: a tie at 0 where density is high
    if nonfinite:
        stored[1][3, :5] = float("nan")
        stored[2][7, 2] = float("-inf")
    values = tuple({"weight": w, "density": d, "gamma": 0.05} for w, d in zip((1.0, 0.7, 0.4), densities))
    params = gta.GtaParams(sparsify=sparsify, consensus=consensus, normalize=normalize, lambda_=lam)
    theirs = merged(params, base.float(), [e.float() for e in stored], values, True, block)

    task = stored_task(base, stored, values)
    sps = gta.sparsifiers(task, params)
    with pytest.MonkeyPatch.context() as mp:
        if block is not None:
            mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
        ours = gta.magnitude_stored(task, sps, params)
    assert ours is not None
    assert same_bits(ours, theirs) == 0
    assert (
        torch.equal(base, task.stored(None, None)) and torch.isnan(stored[1][3, :5]).all() == nonfinite
    )  # inputs unwritten


@pytest.mark.parametrize("block", [None, 1 << 17, 7 * 640])
@pytest.mark.parametrize("merge,nonfinite,scope", [("mean", False, "tensor"), ("sum", True, "tensor"),
                                                   ("mean", False, "model")])  # fmt: skip
def test_ties_reads_the_stored_tensors_with_the_same_bytes(merge, nonfinite, scope, block):
    """Our own ties on bf16 inputs read as stored (ties.merge_stored): the bytes of forming every
    τ_i in float32 first, with exact cancellations (the elected sum 0: the tensor's majority sign
    decides, here −1, so the kept alternatives are used), NaN and ∞, whole and in row blocks, and
    with the model's thresholds given (scope model)."""
    from streammerge.methods import ties

    g = torch.Generator().manual_seed(7)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    stored[1][:8] = (2 * base[:8].float() - stored[0][:8].float()).to(torch.bfloat16)  # cancellations
    stored[2][:8] = base[:8]
    for e in stored:  # mostly negative updates: the tensor's majority sign is −1
        e[8:] = (e[8:].float() - (e[8:].float() - base[8:].float()).abs() * 2).to(torch.bfloat16)
    if nonfinite:
        stored[1][30, :5] = float("nan")
        stored[2][40, 2] = float("inf")
    params = ties.TiesParams(density=0.4, merge=merge, lambda_=0.8, scope=scope)
    statistics = [0.0009, 0.0011, 0.0007] if scope == "model" else None

    def task() -> TensorTask:
        return TensorTask("model.layers.0.mlp.up_proj.weight", base.float(), Rowed([e.float() for e in stored]),
                          (1.0, 1.0, 0.5), statistics=statistics)  # fmt: skip

    def read(i, rows):
        t = base if i is None else stored[i]
        return t if rows is None else t[rows[0] : rows[1]]

    with pytest.MonkeyPatch.context() as mp:
        if block is not None:
            mp.setattr(ties, "CACHE_BYTES", 0)
            mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
        theirs = ties.merge(task(), params)
        fast = task()
        fast.stored = read
        densities = [params.density] * 3
        ours = ties.merge_stored(fast, params, densities, list(statistics) if statistics else None)
    assert ours is not None
    assert same_bits(ours.float(), theirs.float()) == 0


@pytest.mark.parametrize("sparsify", ["none", "magnitude"])
def test_a_float64_merge_does_not_take_the_float32_kernels(sparsify):
    """With compute_dtype float64 the inputs read as stored are widened to float64 by torch's code:
    the bytes of the merge that never had them stored (the kernels compute in float32)."""
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    values = tuple({"weight": w, "density": 0.5} for w in (1.0, 0.7, 0.4))
    params = gta.GtaParams(sparsify=sparsify, consensus="sum", normalize=True)

    def run(with_stored: bool) -> torch.Tensor:
        task = TensorTask("model.layers.0.mlp.up_proj.weight", base.double(), Rowed([e.double() for e in stored]),
                          (1.0, 0.7, 0.4), expert_values=values, seed=3, dtype=torch.float64)  # fmt: skip
        if with_stored:
            task.stored = lambda i, rows: (base if i is None else stored[i])[slice(*rows) if rows else slice(None)]
        return gta.merge(task, params)

    ours, theirs = run(True), run(False)
    assert ours.dtype == torch.float64 and torch.equal(ours, theirs)


def test_ties_from_stored_tensors_keeps_a_nan_threshold_as_the_float32_code_does():
    """A threshold that is NaN (more NaN entries than the density keeps): the kernel compares bit
    patterns, as ties.trim does, so it needs no fallback and gives the same bytes."""
    from streammerge.methods import ties

    g = torch.Generator().manual_seed(9)
    base = (torch.randn(256, 512, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(256, 512, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    stored[1][:40] = float("nan")  # 15 % of the entries, above the 10 % kept
    params = ties.TiesParams(density=0.1)
    task = TensorTask("model.layers.0.mlp.up_proj.weight", base.float(), Rowed([e.float() for e in stored]),
                      (1.0, 1.0, 1.0))  # fmt: skip
    theirs = ties.merge(task, params)
    task.stored = lambda i, rows: (base if i is None else stored[i])[slice(*rows) if rows else slice(None)]
    ours = ties.merge_stored(task, params, [0.1] * 3, None)
    assert ours is not None and torch.isnan(ours).any()
    assert same_bits(ours.float(), theirs.float()) == 0


@pytest.mark.parametrize("block", [None, 1 << 17])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "own_dare"])
def test_random_masks_drawn_in_numba_give_torchs_bytes(method, block):
    """DARE's masks drawn and applied in numba (math/torch_rand.py) and its norms summed in the
    kernel (math/exact_sum.py): the bytes of torch's generator and torch's code, whole and
    streamed in row blocks, with NaN among the inputs."""
    from streammerge.math import torch_rand
    from streammerge.methods import dare

    g = torch.Generator().manual_seed(6)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16).float()
    experts = [(base + (torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16).float()) for _ in range(3)]
    experts[2][5, :3] = float("nan")
    values = tuple({"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.7, 0.5), (0.4, 0.9)))

    def run(use_numba: bool) -> torch.Tensor:
        task = TensorTask("model.layers.0.mlp.up_proj.weight", base.clone(), Rowed(experts), (1.0, 0.7, 0.4),
                          expert_values=values, densities=(0.3, 0.5, 0.9), seed=3)  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            if not use_numba:
                mp.setattr(fused, "available", lambda *t, **k: False)
                mp.setattr(torch_rand, "stream", lambda generator, numel: None)
            if block is not None:
                mp.setattr(gta.ties, "CACHE_BYTES", 0)
                mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
            if method == "own_dare":
                return dare.merge(task, dare.DareParams(combine="ties"))
            consensus = "sum" if method == "dare_ties" else "none"
            return gta.merge(task, gta.GtaParams(sparsify="random", consensus=consensus, rescale=True))

    assert same_bits(run(True), run(False)) == 0


@pytest.mark.parametrize("block", [None, 1 << 17, 5 * 640])
@pytest.mark.parametrize(
    "consensus,normalize,rescale,densities,nonfinite",
    [
        ("sum", False, True, (0.5, 0.5, 0.5), False),  # mergekit's dare_ties
        ("none", False, True, (0.3, 1.0, 0.9), True),  # dare_linear, one expert left whole
        ("sum", True, False, (0.2, 0.6, 0.999), True),
        ("count", True, True, (1e-9, 0.5, 0.7), False),  # almost nothing kept: the norms' cut-off
    ],
)
def test_random_sparsified_gta_reads_the_stored_tensors_with_the_same_bytes(
    consensus, normalize, rescale, densities, nonfinite, block
):
    """DARE on bf16 inputs read as stored (gta.random_stored: masks drawn as bits, norms summed
    from the inputs, then one masking and combining pass): the bytes of torch's generator and
    code on every τ_i formed in float32, with NaN and ∞ among the inputs, whole and in row
    blocks (a block of 5 rows: 3,200 entries, not a multiple of the kernels' 1,024-entry chunks)."""
    from streammerge.math import torch_rand

    g = torch.Generator().manual_seed(8)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    if nonfinite:
        stored[1][3, :5] = float("nan")
        stored[2][7, 2] = float("-inf")
    values = tuple({"weight": w, "density": d} for w, d in zip((1.0, 0.7, 0.4), densities))
    params = gta.GtaParams(sparsify="random", consensus=consensus, normalize=normalize, rescale=rescale)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_rand, "stream", lambda generator, numel: None)  # torch's generator and code
        theirs = merged(params, base.float(), [e.float() for e in stored], values, False, block)

    task = stored_task(base, stored, values)
    with pytest.MonkeyPatch.context() as mp:
        if block is not None:
            mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
        run = gta.random_stored(task, gta.sparsifiers(task, params))
        assert run is not None
        ours = run(params)
    assert same_bits(ours, theirs) == 0
    assert (
        torch.equal(base, task.stored(None, None)) and torch.isnan(stored[1][3, :5]).all() == nonfinite
    )  # inputs unwritten


@pytest.mark.parametrize("block", [None, 1 << 17, 5 * 640])
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("sparsify", ["none", "magnitude", "magnitude_outliers", "random"])
def test_results_rounded_to_bf16_in_the_kernels_are_the_bytes_the_engine_stored(sparsify, nonfinite, block):
    """Where the output is bf16, gta's paths from stored inputs round the result to bf16 in the
    kernel, into the result's own rows (TensorTask.store_into): the bytes that converting their
    float32 result gave, NaN's bits included, whole and in row blocks; a block or tensor with a
    result that is not finite (a NaN input, or finite in float32 but past bf16's largest) comes back
    in float32 as before, for torch to convert and the engine to check (not vouched finite)."""
    from streammerge.math import torch_rand

    g = torch.Generator().manual_seed(9)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    if nonfinite:
        stored[1][3, :5] = float("nan")
        base[200, 0] = 3.0e38  # Σ w_i·τ_i lands between bf16's largest and float32's: ∞ only once rounded
        step = 2.0 ** (127 - 7)  # bf16's spacing there
        for e, steps in zip(stored, (17, 17, 2)):
            e[200, 0] = base[200, 0].float() + steps * step
    values = tuple({"weight": w, "density": d} for w, d in zip((1.0, 0.7, 0.4), (0.9, 0.95, 0.99)))
    params = gta.GtaParams(sparsify=sparsify, consensus="none")

    vouched = []

    def run(store: bool) -> torch.Tensor:
        task = stored_task(base, stored, values)
        vouched.append(task)
        task.out_dtype = torch.bfloat16  # as the engine sets it
        with pytest.MonkeyPatch.context() as mp:
            if not store:  # the kernels' float32 results, as before
                mp.setattr(TensorTask, "store_dtype", property(lambda self: None))
            if block is not None:
                mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
            sps = gta.sparsifiers(task, params)
            if sparsify == "random":
                merge = gta.random_stored(task, sps)
                assert merge is not None
                return merge(params)
            if sparsify == "none":
                return gta.merge(task, params)
            out = gta.magnitude_stored(task, sps, params)
            assert out is not None
            return out

    assert torch_rand.available()
    theirs, ours = run(False), run(True)
    if nonfinite and sparsify == "none" and block is None:
        wide = theirs.float()
        assert wide[200, 0].isfinite() and not wide[200, 0].to(torch.bfloat16).isfinite()  # the case is made
    stored_bytes = [t.to(torch.bfloat16).view(torch.int16) for t in (theirs, ours)]  # TensorComputer.merge's .to
    assert torch.equal(*stored_bytes)
    if not nonfinite:
        assert ours.dtype == torch.bfloat16  # rounded in the kernel, not by torch
    # the engine skips its finiteness check of a result vouched for: only where every block was rounded
    # in a kernel (blocks of 3,200 entries may be below fused.MIN_ELEMENTS: torch's code, not vouched)
    assert not vouched[0].vouched_finite
    if nonfinite:
        assert not vouched[1].vouched_finite
    elif block != 5 * 640:
        assert vouched[1].vouched_finite


def della_ranks(x: torch.Tensor) -> torch.Tensor:
    """Each entry's position in torch's stable argsort of its row's magnitudes."""
    order = torch.argsort(x.abs(), dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order).contiguous())


def della_as_before(x: torch.Tensor, draws: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """della_magprune's mask as methods/gta.py made it before the kernel: the stable argsort's ranks
    scattered, each rank's probability computed on the tensor of ranks, then the draws compared."""
    probs = (density - eps) + della_ranks(x).to(torch.float32).div_(max(x.shape[1] - 1, 1)).clamp_(0, 1).mul_(2 * eps)
    return x * (draws < probs)


@pytest.mark.parametrize("shape", [(7, 13), (300, 896), (16, 4864), (1, 100_003)])
def test_della_mask_is_the_stable_argsorts(shape):
    """The kernel's ranks and the table of probabilities by rank give the bytes of the sort-based
    code: ±0 equal, subnormals, ±∞, NaNs of either sign and any payload last and equal, many ties
    (bf16 values), rows whose length leaves a vector loop's tail."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 1e-3).bfloat16().float()
    flat = x.view(-1)
    flat[::97], flat[1::89], flat[2::107], flat[3::109], flat[7::113] = 0.0, -0.0, math.inf, -math.inf, 1e-42
    flat[::101] = math.nan
    flat.view(torch.int32)[5::103] = -0x3FFFFF  # a negative NaN with another payload
    draws = torch.rand(shape, generator=g)
    for density, eps in ((0.5, 0.1), (0.3, 0.15), (0.9, 0.05)):
        span = max(shape[1] - 1, 1)
        by_rank = (density - eps) + torch.arange(shape[1]).to(torch.float32).div_(span).clamp_(0, 1).mul_(2 * eps)
        ours = x.clone()
        fused.della_keep(ours, draws, by_rank)
        assert same_bits(ours, della_as_before(x, draws, density, eps)) == 0
        gathered = x * (draws < by_rank[della_ranks(x)])  # the torch fallback's form
        assert same_bits(gathered, della_as_before(x, draws, density, eps)) == 0


@pytest.mark.parametrize("sparsify", ["none", "magnitude", "random"])  # mergekit's task_arithmetic, ties, dare
def test_a_nan_in_a_tensor_the_kernels_round_still_stops_the_merge_naming_its_file(tmp_path, sparsify):
    """The engine does not check a result the kernels vouched finite (TensorTask.store_into): a NaN
    in a bf16 input large enough for them must still come back unvouched, be found, and be named
    with the file that brought it (and a clean merge of the same inputs still vouches)."""
    from safetensors.torch import load_file, save_file

    from streammerge import Expert, Recipe, merge
    from streammerge.errors import NonFiniteError

    assert fused.available(torch.zeros(fused.MIN_ELEMENTS, dtype=torch.bfloat16), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)  # 2 × MIN_ELEMENTS entries
    for name, delta in {"base": None, "e1": 0.002, "e2": 0.003}.items():
        w = base if delta is None else (base.float() + delta * torch.randn(512, 256, generator=g)).to(torch.bfloat16)
        os.makedirs(tmp_path / name)
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))

    def run(out: str):
        experts = tuple(Expert(str(tmp_path / e), weight=0.5, density=0.6) for e in ("e1", "e2"))
        params = {"sparsify": sparsify, "consensus": "none" if sparsify == "none" else "sum"}
        merge(Recipe("gta", str(tmp_path / "base"), experts, str(tmp_path / out), parameters=params))

    from streammerge.engine.tensors import TensorComputer

    tasks, kept = [], []
    with pytest.MonkeyPatch.context() as mp:
        real = TensorComputer.task
        mp.setattr(TensorComputer, "task", lambda self, t, s=None: tasks.append(real(self, t, s)) or tasks[-1])
        real_kept = fused.MagnitudeStored.for_experts.__func__
        mp.setattr(
            fused.MagnitudeStored, "for_experts", classmethod(lambda c, n: kept.append(real_kept(c, n)) or kept[-1])
        )
        run("clean")
    assert [t.vouched_finite for t in tasks] == [True]
    # the histograms kept from tensor to tensor (MagnitudeStored.for_experts) go when the merge ends
    assert bool(kept) == (sparsify == "magnitude") and not fused._MAGNITUDE_STORED
    bad = dict(load_file(str(tmp_path / "e2" / "model.safetensors")))
    bad["w"][300, 7] = float("nan")
    save_file(bad, str(tmp_path / "e2" / "model.safetensors"))
    with pytest.raises(NonFiniteError, match=r"e2.*model\.safetensors: tensor 'w' contains NaN or Inf"):
        run("bad")


@pytest.mark.parametrize("block", [None, 1 << 17])
@pytest.mark.parametrize("guess", ["sampled", "missed"])
@pytest.mark.parametrize(
    "sparsify,densities", [("magnitude", (0.3, 0.5, 0.9)), ("magnitude_outliers", (0.5, 0.9, 0.2))]
)
@pytest.mark.parametrize("edges", [False, True])
def test_thresholds_guessed_from_a_sample_are_the_thresholds_of_two_passes(sparsify, densities, guess, block, edges):
    """ties.count_thresholds on a tensor of fused.SPAN_ELEMENTS: the sample's guess lets the high-bit
    pass count the low bits too (one full pass fewer); where it misses, a pass of low bits follows.
    The thresholds, tie counts and merged bytes are those of the two-pass path either way, also at
    the edges of the bit patterns (`edges`: a threshold at 0, the first bin, and NaN and ∞)."""
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(384, 640, generator=g) * 0.02).to(torch.bfloat16)
    stored = [(base.float() + torch.randn(384, 640, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    if edges:
        stored[0][:320] = base[:320]  # τ = 0 on 5/6 of the entries: expert 0's threshold is 0
        stored[1][3, :50] = float("nan")
        stored[1][9, :50] = float("inf")
    values = tuple({"weight": w, "density": d, "gamma": 0.05} for w, d in zip((1.0, 0.7, 0.4), densities))
    params = gta.GtaParams(sparsify=sparsify, consensus="sum")

    captured = []  # what combine's tie counts came from: the spanned pass's capture (an array) or a pass (None)

    def run(span: bool, missed: bool = False):
        task = stored_task(base, stored, values)
        sps = gta.sparsifiers(task, params)
        passes = []
        with pytest.MonkeyPatch.context() as mp:
            real_ties = fused.MagnitudeStored.captured_ties

            def captured_ties(self, rows, bounds, modes, n):
                ties, left = real_ties(self, rows, bounds, modes, n)
                captured.append(int(((modes == 2) & (left != 2)).sum()))  # COUNT bounds whose ties it holds
                return ties, left

            mp.setattr(fused.MagnitudeStored, "captured_ties", captured_ties)
            mp.setattr(fused, "SPAN_ELEMENTS", (1, 1 << 31) if span else (0, 0))
            if missed:  # a guess far below every threshold
                mp.setattr(gta.ties, "guessed_span", lambda sel, sample, numel: 0 if sel else -2)
            for name in ("count_low", "count_span"):
                real = getattr(fused.MagnitudeStored, name)
                every = lambda self, *a, _r=real, **kw: passes.append(a[3] if len(a) > 3 else 1) or _r(self, *a, **kw)  # noqa: E731
                mp.setattr(fused.MagnitudeStored, name, every)
            if block is not None:
                mp.setattr(TensorTask, "row_blocks", lambda self, m=None, _r=TensorTask.row_blocks: _r(self, block))
            out = gta.magnitude_stored(task, sps, params)
        return out, [sp.bounds for sp in sps], passes

    theirs, their_bounds, their_passes = run(False)
    assert not any(captured)
    captured.clear()
    ours, our_bounds, our_passes = run(True, guess == "missed")
    if guess == "sampled" and sparsify == "magnitude":  # some tie counts from the capture (expert 0's at 0
        assert any(captured)  # under `edges`: 5/6 of its entries, past the capture's 1 in 32: a pass counts those)
    else:
        assert not any(captured)  # no span, or breadcrumbs (not captured): a pass counts the ties
    assert our_bounds == their_bounds and torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    again = run(True, guess == "missed")  # the histograms kept for the next tensor start again at zero
    assert again[1] == their_bounds and torch.equal(again[0].view(torch.int16), theirs.view(torch.int16))
    full = [p for p in our_passes if p == 1]  # passes over every entry (the sample reads 1 in SAMPLE_EVERY)
    assert fused.SAMPLE_EVERY in our_passes
    if guess == "sampled":
        assert len(full) <= len(their_passes) - 1  # breadcrumbs: its second threshold may lie past the span
    else:
        assert len(full) == len(their_passes)


def test_a_first_merge_says_it_compiles_the_kernels_and_a_second_loads_them(tmp_path):
    """Where numba's cache lacks a kernel (the first merge after installing; here mergekit's
    task_arithmetic, as our gta reads it), the merge says it is compiling (its first tensor waits
    seconds) and its last line counts those seconds; its plan counts what compiling keeps
    (fused.COMPILE_BYTES) and holds its peak. The next merge loads them from the cache, says nothing
    of it and plans without it. A first merge with another method (TIES), whose kernels are not
    among those cached, compiles them and plans for it too."""
    import json

    import subprocess
    import sys

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    for name in ("base", "e1", "e2"):
        os.makedirs(tmp_path / name)
        w = (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)  # 2 × MIN_ELEMENTS entries
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    experts = ["--expert", str(tmp_path / "e1"), "--expert", str(tmp_path / "e2"), "--weight", "0.5", "--weight", "0.5"]
    method = ["--method", "gta", "--param", "sparsify=none", "--param", "consensus=none"]

    def run(out: str, method: list[str] = method) -> tuple[str, dict]:
        command = [sys.executable, "-m", "streammerge.cli", "merge", "--base", str(tmp_path / "base"), *experts,
                   *method, "--out", str(tmp_path / out), "--memory-report", str(tmp_path / f"{out}.json")]  # fmt: skip
        r = subprocess.run(command, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr, json.load(open(tmp_path / f"{out}.json"))

    (first, cold), (second, warm) = run("first"), run("second")
    assert "compiling numba kernels" in first and " s of it compiling kernels, once) on cpu" in first
    assert "compiling" not in second and "merged into" in second
    # the plans' baselines (this process's memory before planning) differ by some KB between runs
    assert abs(cold["planned_peak_ram"] - warm["planned_peak_ram"] - fused.COMPILE_BYTES) < 4 << 20
    assert cold["measured_peak_ram"] <= cold["planned_peak_ram"], cold
    (third, ties_cold), (_, ties_warm) = (
        run("ties-first", ["--method", "ties"]),
        run("ties-second", ["--method", "ties"]),
    )
    assert "compiling numba kernels" in third
    assert abs(ties_cold["planned_peak_ram"] - ties_warm["planned_peak_ram"] - fused.COMPILE_BYTES) < 4 << 20
    assert ties_cold["measured_peak_ram"] <= ties_cold["planned_peak_ram"], ties_cold


class _Calls:
    """fused_kernels as fused sees it, noting which kernels are called."""

    def __init__(self, module):
        self.module, self.called = module, set()

    def __getattr__(self, name: str):
        kernel = getattr(self.module, name)
        if not hasattr(kernel, "signatures"):
            return kernel

        def call(*args):
            self.called.add(name)
            return kernel(*args)

        call.stats = kernel.stats  # fused._cached_kernels asks for numba's cache folder
        return call


# (method, stored dtype, recipe parameters, per-expert density): every path of every method that plans numba's runtime
KERNEL_PATHS = [
    ("ties", "bfloat16", {}, None),
    ("ties", "bfloat16", {"scope": "model"}, None),
    ("ties", "float32", {}, None),
    ("dare", "bfloat16", {}, None),
    ("dare_ties", "float32", {}, None),
    *[
        ("gta", dtype, {"sparsify": sparsify, "consensus": "sum", "rescale": rescale, **extra}, 0.5)
        for dtype in ("bfloat16", "float32")
        for sparsify in gta.SPARSIFIERS
        for rescale in (False, True)
        for extra in ({}, {"tie_break": "mergekit"})
        if not (extra and not sparsify.startswith("magnitude"))
    ],
]


def test_a_plan_asks_numbas_cache_for_the_kernels_its_merge_calls(tmp_path, monkeypatch):
    """Each Method.kernels (what its plan asks numba's cache for, to count what compiling them keeps:
    fused.runtime_bytes) names the kernels a merge by that path calls, on tensors below and above
    fused.SPAN_ELEMENTS: not fewer, or the first merge of a method whose kernels were not
    compiled yet would compile above its plan; and no more (but where the data decide), or its plans
    would count a compile that never comes."""
    from safetensors.torch import save_file

    from streammerge import Expert, Recipe
    from streammerge.engine import Merge, RunOptions
    from streammerge.methods.registry import get_method

    shapes = {"small": (512, 256), "large": (1024, 1100)}  # 2 × MIN_ELEMENTS; over SPAN_ELEMENTS (the sample)
    assert math.prod(shapes["large"]) >= fused.SPAN_ELEMENTS[0]
    for dtype in ("bfloat16", "float32"):
        g = torch.Generator().manual_seed(7)
        for name in ("base", "e1", "e2"):
            tensors = {k: (torch.randn(*s, generator=g) * 0.02).to(getattr(torch, dtype)) for k, s in shapes.items()}
            os.makedirs(tmp_path / dtype / name)
            save_file(tensors, str(tmp_path / dtype / name / "model.safetensors"))
    calls = _Calls(fused._load())
    monkeypatch.setattr(fused, "_load", lambda: calls)
    for i, (name, dtype, parameters, density) in enumerate(KERNEL_PATHS):
        method, implied = get_method(name)
        params = method.params_type(**{**implied, **parameters})
        stored = method.stored_memory is not None and all(
            fused.reads_stored(torch.float32, "cpu", [getattr(torch, dtype)] * 3, math.prod(s))
            and method.stored_memory("w", s, 2, params) is not None
            for s in shapes.values()
        )
        experts = tuple(Expert(str(tmp_path / dtype / e), weight=1.0, density=density) for e in ("e1", "e2"))
        calls.called.clear()
        recipe = Recipe(
            name, str(tmp_path / dtype / "base"), experts, str(tmp_path / f"out-{i}"), parameters=parameters
        )
        Merge(recipe, RunOptions()).run()
        expected = set(method.kernels(params, stored))
        assert calls.called <= expected, (name, dtype, parameters, stored)
        if parameters.get("tie_break") != "mergekit":  # its mask kernel only where ties do not straddle the cut
            assert calls.called == expected, (name, dtype, parameters, stored)


def test_the_kernels_keep_the_thread_count_asked_for_on_the_threading_layer_chosen(tmp_path):
    """In a fresh process (numba's threading layer is chosen once), a TIES merge of bf16 inputs
    (whose first kernel call asks numba for its thread count) with threads=1: the layer chosen in
    math/fused_kernels.py (OpenMP where numba can load it, its own pool elsewhere), and the thread
    count asked for, which numba's OpenMP layer sets to every core as it starts."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(6)
    for name in ("base", "e1", "e2"):
        os.makedirs(tmp_path / name)
        w = (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)  # 2 × MIN_ELEMENTS entries
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    script = f"""
import numba, torch
from streammerge import Expert, Recipe
from streammerge.engine import Merge, RunOptions
experts = tuple(Expert({str(tmp_path)!r} + "/" + e, weight=1.0, density=0.5) for e in ("e1", "e2"))
merge = Merge(Recipe("ties", {str(tmp_path / "base")!r}, experts, {str(tmp_path / "out")!r}), RunOptions(threads=1))
report = merge.run()
print(numba.threading_layer(), report.threads, torch.get_num_threads())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    layer, *threads = r.stdout.split()
    assert layer in ("omp", "workqueue") and threads == ["1", "1"]
    if sys.platform == "linux":  # numba's wheels load GNU OpenMP there
        assert layer == "omp"
