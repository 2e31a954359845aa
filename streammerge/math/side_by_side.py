"""Independent per-expert solves two at a time on the CPU, each on one thread.

OrthoMerge's Procrustes solves are independent of one another once the rotation subspace is
built, and are made of factorisations that run on one thread anyway (lapack.py, for bytes that do
not depend on the thread count) and matrix products, whose bytes do not depend on it either. So
two of them side by side, each on one thread, give the bytes of one after the other, in 0.67-0.74
of the time on two cores (bench/results/procrustes-pairs.md). The second input and solve are held
meanwhile: the plan counts them (Need.side_by_side) and the engine says where they fit
(TensorTask.side_by_side).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

In = TypeVar("In")
Out = TypeVar("Out")

# two solves side by side take this share of one after the other's time (0.67-0.74 measured on two
# cores, bench/results/procrustes-pairs.md): what `plan`'s time estimate counts for them
TIME = 0.7


def each(
    n: int, given: Callable[[int], In], solve: Callable[[In], Out], side_by_side: bool
) -> Iterator[tuple[int, Out]]:
    """(i, solve(given(i))) for i < n, in order; given(i) is called on this thread, in order.
    `side_by_side`: two solves at once, the second on a worker thread, torch on one thread each."""
    if not side_by_side:
        for i in range(n):
            yield i, solve(given(i))
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(1, thread_name_prefix="side-by-side")
    try:
        for i in range(0, n, 2):
            inputs = [given(j) for j in range(i, min(i + 2, n))]
            torch.set_num_threads(1)
            try:
                later = pool.submit(solve, inputs[1]) if len(inputs) > 1 else None
                results = [solve(inputs[0])] + ([later.result()] if later is not None else [])
            finally:
                torch.set_num_threads(threads)
            del inputs  # before the caller's work on the results: each may be the size of a weight
            yield from zip(range(i, i + len(results)), results)
            del results
    finally:
        # never waits: done, the worker is idle; on Ctrl-C (or an error) its solve, minutes at 8B
        # shapes, is left running and the command ends its process at once (cli.entry), resumable
        pool.shutdown(wait=False, cancel_futures=True)
