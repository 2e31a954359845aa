"""glibc's allocator, set for a process that streams blocks of tens of MB through memory.

By default glibc gives every allocation above a threshold (128 kB, rising with what it sees, at
most 32 MB) its own mapping and unmaps it when freed, and returns the heap's free top to the
system; a merge allocates and frees its row blocks thousands of times, so each block's pages are
faulted in and zeroed again every time. Measured on a warm task-arithmetic merge of the 0.5 B
preset (bench/results/README.md, "Round four"): 385,000 to 1,170,000 page faults and 1.0 to 2.4 s
of system time by default, 130,000 and 0.5 to 0.7 s with blocks of up to 32 MB kept on the heap and
up to 128 MB of free heap kept; the peak resident set grew by about 60 MB (0.47-0.52 GB to
0.54-0.60 GB). Either setting alone did not help. Set by the command only (a library does not
change its host's allocator); other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: blocks above it keep their own mappings
TRIM_THRESHOLD = 128 * 1024 * 1024


def keep_blocks_on_the_heap() -> bool:
    """Set glibc's thresholds for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
