"""How many threads the CPU arithmetic uses.

On a loaded machine, more BLAS threads than free cores make every thread wait for the others at
each synchronisation point: on this project's 2-core machine under load, OrthoMerge took 68 s of
CPU per SmolLM2 layer with two threads against 12 s with one (speed issue). So by default the
merge takes the cores this process may run on (its affinity) less what the rest of the machine
keeps busy on them, and at least one; `--threads N` overrides it. Measured: bench/threads_bench.py.

"What the rest keeps busy" is measured, not the load average: the 1-minute load average still
counts a merge that ended seconds ago, so of two merges in a row on two cores the second took one
thread (DARE-TIES of the 0.5 B preset: 8.6-9.5 s on one, 6.3-6.8 s on two; `python
bench/back_to_back.py`, bench/results/README.md "Round seven"). Where the
system says (Linux's /proc/stat), it is the CPU time the affine cores spent busy since the command
started (`mark`, before its imports: a window of about a second at no cost), less this process's
own; elsewhere, the load average.
"""

from __future__ import annotations

import os
import time

MIN_WINDOW = 0.25  # seconds: shorter windows are sampled for this long (USER_HZ ticks are 10 ms)

_mark: tuple[float, float, float] | None = None  # (monotonic time, affine busy seconds, own seconds)


def available_cores() -> int:
    return len(_affinity()) or os.cpu_count() or 1


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the listed CPUs have spent busy since boot; None where /proc/stat is absent."""
    try:
        with open("/proc/stat", "rb") as f:
            return busy_seconds(f.read(), cpus, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        return None


def busy_seconds(stat: bytes, cpus: set[int], ticks_per_second: int) -> float:
    """From /proc/stat's text: the seconds the listed CPUs spent busy (all but idle and I/O wait;
    time stolen by a hypervisor counts as busy: not ours to use)."""
    busy = 0
    for line in stat.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith(b"cpu") or fields[0] == b"cpu" or int(fields[0][3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        values = [int(v) for v in fields[1:9]]
        busy += sum(values) - values[3] - values[4]
    return busy / ticks_per_second


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def mark() -> None:
    """Start the window over which choose_threads measures the other processes' load."""
    global _mark
    busy = _busy_seconds(_affinity())
    _mark = None if busy is None else (time.monotonic(), busy, _own_seconds())


def others_busy() -> float | None:
    """Cores' worth of CPU the other processes used on our cores since `mark` (taken now and
    sampled for MIN_WINDOW where none is, or too recent); None where that cannot be measured."""
    if _mark is None or time.monotonic() - _mark[0] < MIN_WINDOW:
        mark()
        if _mark is None:
            return None
        time.sleep(MIN_WINDOW)
    assert _mark is not None
    busy = _busy_seconds(_affinity())
    if busy is None:
        return None
    seconds = time.monotonic() - _mark[0]
    return max(0.0, (busy - _mark[1]) - (_own_seconds() - _mark[2])) / seconds


def choose_threads(requested: int | None = None) -> int:
    if requested:
        return max(1, requested)
    cores = available_cores()
    busy = others_busy()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))
