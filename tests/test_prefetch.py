"""The read-ahead thread (streammerge/prefetch.py): it covers every range it is given, stays within
its window of the consumer, and reports a rate only where it timed one."""

from __future__ import annotations

import time

import pytest

from streammerge.prefetch import ADVISE, ReadAhead


def wait_for(cond, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("advise", [False, True] if ADVISE else [False])
def test_the_read_ahead_stays_within_its_window_and_then_covers_every_range(tmp_path, advise):
    path = tmp_path / "shard"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    ranges = [(str(path), offset, 64 * 1024) for offset in range(0, 1 << 20, 64 * 1024)]
    ahead = ReadAhead(ranges, window=128 * 1024, advise=advise).start()
    try:
        assert wait_for(lambda: ahead.read > 0)
        time.sleep(0.2)  # the consumer has taken nothing: the thread waits at its window
        assert ahead.read <= 128 * 1024 + 2 * 64 * 1024
        for _ in ranges:
            ahead.advance(64 * 1024)
        assert wait_for(lambda: ahead.read == 1 << 20)
    finally:
        ahead.stop()
    if advise:
        assert ahead.throughput() is None  # the kernel reads in the background: nothing timed here
    else:
        assert ahead.throughput() > 0
