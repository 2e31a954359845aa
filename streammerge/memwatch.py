"""Measured memory: this process's anonymous resident memory (RssAnon) and its peak.

Page cache from memory-mapped inputs is file-backed and reclaimable, so it is not what a
budget limits; RssAnon is. A daemon thread samples /proc/self/status every few milliseconds,
since the kernel keeps a peak only for the total (VmHWM), not for the anonymous part.
"""

from __future__ import annotations

import threading

import psutil


def rss_anon() -> int:
    """Current anonymous resident bytes (Linux); falls back to total RSS elsewhere."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class PeakSampler:
    """`with PeakSampler() as s: ...` then `s.peak` (bytes) and `s.baseline` (at start)."""

    def __init__(self, interval: float = 0.003):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> "PeakSampler":
        self.baseline = self.peak = rss_anon()
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_anon())
