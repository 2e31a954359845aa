"""glibc's allocator: kept fast for a command, or kept to the plan under an explicit budget.

keep_blocks_on_the_heap(), for the command: by default glibc gives every allocation above a
threshold (128 kB, rising with what it sees, at most 32 MB) its own mapping, unmaps it when freed
and returns the heap's free top to the system; a merge allocates and frees its row blocks
thousands of times, so each block's pages are faulted in and zeroed again every time. Measured on
a task-arithmetic merge of the 0.5 B preset (bench/allocator_ab.py; bench/results/README.md,
"Round four"): 0.17-0.19 M minor page faults against 0.23-1.22 M, 5.4-7.3 s warm against 6.9-8.1 s,
with row blocks of up to 32 MB kept on the heap and up to 128 MB of free heap kept; the anonymous
peak of that merge 422 MB against 329 MB (its plan: 427 MB). Either setting alone did not help.
Set by the command only (a library does not change its host's allocator).

huge_pages_for_large_tensors(), for the command: torch's CPU allocator asks for transparent huge
pages (madvise MADV_HUGEPAGE; torch's THP_MEM_ALLOC_ENABLE) for every tensor of 2 MB or more, so
where the system's setting is `madvise` or `always` a fresh block costs one page fault per 2 MB,
not one per 4 kB (blocks of 32 MB and more are mapped anew by glibc every time they are made).
Measured side by side on the 0.5 B preset, warm (bench/allocator_ab.py --setting thp;
bench/results/README.md, "Round eight"): without it slerp, nearswap and model_stock spent 1.7-7.5 s
of system time faulting pages in (slerp: 8.0-9.0 s warm against 5.8 s with it). Read by torch at
its first allocation, so set before torch is imported; the user's own value wins
(THP_MEM_ALLOC_ENABLE=0 turns it off).

return_freed_memory_to_os(), under an explicit --max-ram (set after the first, so it wins): every
allocation of 1 MB or more mapped on its own and given back when freed, so that the anonymous
memory stays at the working set the plan promises (glibc's own growing threshold once held 313 MB
for a 239 MB plan). Other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: blocks above it keep their own mappings
TRIM_THRESHOLD = 128 * 1024 * 1024


def _thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's two thresholds for this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def keep_blocks_on_the_heap() -> bool:
    return _thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)


def huge_pages_for_large_tensors() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    return _thresholds(threshold, threshold)
