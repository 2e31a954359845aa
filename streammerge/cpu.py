"""How many threads the CPU arithmetic uses.

On a loaded machine, more BLAS threads than free cores make every thread wait for the others at
each synchronisation point: on this project's 2-core machine under load, OrthoMerge took 68 s of
CPU per SmolLM2 layer with two threads against 12 s with one (speed issue). So by default the
merge takes the cores this process may run on (its affinity) less the load the rest of the
machine puts on them (the 1-minute load average, measured before the merge starts), and at least
one; `--threads N` overrides it. Measured: bench/threads_bench.py.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None) -> int:
    if requested:
        return max(1, requested)
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))
