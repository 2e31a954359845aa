"""streammerge/allocator.py, read from glibc's own accounts (mallinfo2): the command's setting puts
a 24 MB row block on the heap and keeps its memory there once freed, for the next block; an
explicit budget's setting maps it on its own and gives it back when freed. Each in a fresh
process, since the settings are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
import numpy as np
from streammerge import allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

try:
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
except (OSError, AttributeError):
    print(json.dumps(None)); sys.exit(0)
mallinfo2.restype = Info
if not getattr(allocator, sys.argv[1])():
    print(json.dumps(None)); sys.exit(0)
block = np.empty(6 * 1024 * 1024, dtype=np.float32)  # a 24 MB row block, from glibc's malloc
block.fill(1.0)
held = mallinfo2()
del block
freed = mallinfo2()
print(json.dumps({"mapped": held.hblkhd, "heap": held.arena, "mapped_after": freed.hblkhd, "heap_after": freed.arena}))
"""
BLOCK = 24 * 1024 * 1024


def accounts(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result is None:
        pytest.skip("the C library is not glibc 2.33 or newer")
    return result


def test_the_command_keeps_freed_blocks_and_a_budget_returns_them():
    kept = accounts("keep_blocks_on_the_heap")
    assert kept["mapped"] < BLOCK <= kept["heap"], kept  # on the heap
    assert kept["heap_after"] >= BLOCK, kept  # still there for the next block
    returned = accounts("return_freed_memory_to_os")
    assert returned["mapped"] >= BLOCK, returned  # a mapping of its own
    assert returned["mapped_after"] < BLOCK and returned["heap_after"] < BLOCK, returned  # given back


SMAPS_PROBE = """
import os, streammerge.cli as c, streammerge.console as console
def probe():
    import torch
    t = torch.empty(64 << 20, dtype=torch.uint8)
    flags = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= t.data_ptr() < end
            elif head == "VmFlags:" and inside:
                flags = line.split()[1:]
    print(os.environ["THP_MEM_ALLOC_ENABLE"], "hg" in flags)
c.entry = probe
console.entry()
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps") or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="reads the mappings' flags from /proc, on a kernel with transparent huge pages",
)
@pytest.mark.parametrize("given, advised", [(None, True), ("0", False)])
def test_the_command_has_torch_ask_for_huge_pages_for_large_tensors_unless_told(given, advised):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", SMAPS_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [given or "1", str(advised)]  # "hg": the mapping was madvise(MADV_HUGEPAGE)d
