"""How long a merge will take on this machine, for `streammerge plan`: the reads at a read rate
measured here, and each method's compute (Method.cost) at rates calibrated here in about a second.

An estimate, not a promise: the cost models count the dominant work only (factorisations, matrix
products, elementwise passes) and the read rate is taken from one read of part of an input file,
which the page cache may flatter. Good to tell minutes from hours, and hours from days.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from ..io.checkpoint import Checkpoint
from ..math.side_by_side import TIME as side_by_side_time
from ..methods.base import Cost
from ..units import format_duration, format_size
from .inputs import MergeInputs
from .placement import generators_of

READ_PROBE = 128 * 1024 * 1024  # bytes read to measure the disk
HOURS = 3600.0


@dataclass(frozen=True)
class Rates:
    read: float  # bytes/s from the inputs
    memory: float  # bytes/s of an elementwise float32 operation
    matmul: float  # float32 flop/s of a matrix product on this process's threads
    factorisation: float  # m·n·min(m, n) units/s of an SVD on one thread (math/lapack.py), float32
    where: str  # what the read rate was measured on


def _seconds(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def calibrate(inputs: MergeInputs, device: torch.device) -> Rates:
    """This machine's rates, measured now (about a second)."""
    from ..math import lapack

    a = torch.randn(1024, 1024, device=device)
    matmul = 2 * 1024**3 / _seconds(lambda: a @ a)
    b = torch.randn(1 << 23, device=device)
    memory = 3 * b.numel() * 4 / _seconds(lambda: b + b)  # two reads and a write
    c = torch.randn(512, 512, device=device)
    factorisation = 512**3 / _seconds(lambda: lapack.svd(c, full_matrices=False))
    # a Hub input not yet downloaded is a header and a hole (engine/remote.py): not a disk read
    files = [f for src in inputs.sources if isinstance(src, Checkpoint) for f in src.files
             if os.stat(f).st_blocks * 512 >= os.path.getsize(f) // 2]  # fmt: skip
    path = max(files, key=os.path.getsize) if files else None
    read, where = math.inf, "no input file"
    if path is not None:
        read, where = _read_rate(path), os.path.basename(path)
    return Rates(read, memory, matmul, factorisation, where)


def _read_rate(path: str) -> float:
    """Bytes/s of a sequential read of up to READ_PROBE bytes, asked out of the page cache first."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, READ_PROBE, os.POSIX_FADV_DONTNEED)
        start, n = time.perf_counter(), 0
        while n < READ_PROBE:
            chunk = f.read(8 * 1024 * 1024)
            if not chunk:
                break
            n += len(chunk)
    return n / max(time.perf_counter() - start, 1e-9) if n else math.inf


@dataclass(frozen=True)
class Estimate:
    read_seconds: float
    compute_seconds: float
    read_bytes: int
    rates: Rates

    @property
    def seconds(self) -> float:
        return self.read_seconds + self.compute_seconds

    def line(self) -> str:
        rate = "∞" if math.isinf(self.rates.read) else f"{format_size(self.rates.read)}/s"
        text = (
            f"estimated time on this machine: about {format_duration(self.seconds)} (reading "
            f"{format_size(self.read_bytes)} at {rate}, measured on {self.rates.where}: "
            f"{format_duration(self.read_seconds)}; compute {format_duration(self.compute_seconds)})"
        )
        if self.seconds >= HOURS:
            text += "\nthis merge will take hours here" + (
                ": a GPU is the place for it (--device cuda)" if self.compute_seconds > self.read_seconds else ""
            )
        return text


def tensor_compute_seconds(
    cost: Cost, shape: tuple[int, ...], n: int, rates: Rates, side_by_side: bool = False
) -> float:
    """One tensor's compute at the calibrated rates: its elementwise passes over the N experts'
    float32 copies, its matrix products and its factorisations; with `side_by_side` (the plan
    counted it, TensorPlan.side_by_side) its per-expert solves two at a time."""
    passes = cost.passes * math.prod(shape) * n * 4 / rates.memory
    factorisation = cost.factorisation - (cost.paired * (1 - side_by_side_time) if side_by_side else 0.0)
    return passes + cost.flops / rates.matmul + factorisation / rates.factorisation


def estimate(
    inputs: MergeInputs, read_bytes: int, rates: Rates, side_by_side: frozenset[str] = frozenset()
) -> Estimate:
    """Reads at the measured rate; each merged tensor's Method.cost at the calibrated rates, the
    tensors named in `side_by_side` with their solves two at a time."""
    method, n = inputs.method, len(inputs.experts)

    def cost(name: str, shape: tuple[int, ...]) -> Cost:
        params, generators = inputs.values[name].params, generators_of(inputs, name)
        if generators is not None:
            return method.generators_cost(name, shape, n, params, generators)
        return method.cost(name, shape, n, params)

    compute = sum(
        tensor_compute_seconds(cost(t.name, t.shape), t.shape, n, rates, t.name in side_by_side)
        for t in inputs.merged_tensors()
    )
    return Estimate(read_bytes / rates.read if read_bytes else 0.0, compute, read_bytes, rates)
