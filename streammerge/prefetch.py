"""Read-ahead: a background thread has the byte ranges of the next tensors of every input file
read into the page cache while the current tensor is computed and the previous one written.

Where the system has posix_fadvise (Linux), it asks the kernel to read each range (WILLNEED),
which reads it without copying it anywhere: copying every input byte into a buffer only to drop
it cost 0.8-7.3 s of system time per 3.9 GB here, against 0.06 s (bench/read_ahead_ways.py;
bench/results/README.md, "Round four"). Elsewhere it reads through one small reusable buffer.
Either way it adds no tensor-sized memory; the page cache it fills is reclaimable. The compute
thread then copies from memory, not from disk.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

from .plan import PREFETCH_BUFFER

ADVISE = hasattr(os, "posix_fadvise")


class ReadAhead:
    """`ReadAhead(ranges, window)`: ranges (path, offset, length) in consumption order; the
    thread stays at most `window` bytes ahead of `advance(n)` calls from the consumer."""

    def __init__(self, ranges: Iterable[tuple[str, int, int]], window: int = 512 * 1024 * 1024, advise: bool = ADVISE):
        """`advise`: ask the kernel to read (posix_fadvise) rather than read through a buffer."""
        self.ranges = list(ranges)
        self.advise = advise
        self.window = window
        self.consumed = 0
        self.read = 0
        self.seconds = 0.0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def start(self) -> "ReadAhead":
        self._thread.start()
        return self

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self.consumed += nbytes
            self._cond.notify()

    def throughput(self) -> float | None:
        """Bytes per second read through the buffer; None (not measured) where the kernel was asked
        to read: it reads in the background, so no rate can be timed here."""
        if self.advise:
            return None
        return self.read / self.seconds if self.seconds > 0 else 0.0

    def _run(self) -> None:
        view = memoryview(bytearray(0 if self.advise else PREFETCH_BUFFER))
        fds: dict[str, int] = {}
        try:
            for path, offset, length in self.ranges:
                with self._cond:
                    while not self._stop and self.read - self.consumed > self.window:
                        self._cond.wait(0.1)
                    if self._stop:
                        return
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                end = offset + length
                started = time.perf_counter()
                if self.advise:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                while offset < end and not self.advise:
                    n = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
                    if n <= 0:
                        break
                    offset += n
                self.seconds += time.perf_counter() - started
                self.read += length
        except OSError:
            return  # read-ahead is an optimisation; the compute thread reports real errors
        finally:
            for fd in fds.values():
                os.close(fd)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)
