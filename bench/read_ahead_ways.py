#!/usr/bin/env python3
"""Ways to bring a merge's inputs into the page cache, cold (page cache dropped before each):
reading every byte through a 16 MB buffer (the read-ahead before round four), asking the kernel
with posix_fadvise(WILLNEED) and then touching each page through a memory map (what the merge's
compute thread does), touching through the map alone, and reading with O_DIRECT into one reused
buffer, past the page cache (not what a merge does: the disk read without the page cache).

    python bench/read_ahead_ways.py [--inputs 'bench/.work/0.5b/*/*.safetensors'] [--repeats 2]

Results: bench/results/read-ahead-ways.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches, provenance, provenance_line, write_results  # noqa: E402


def touch(files: list[str]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            for offset in range(0, len(m), mmap.PAGESIZE):
                total += m[offset]
    return total


def pread(files: list[str]) -> None:
    view = memoryview(bytearray(16 << 20))
    for path in files:
        fd, offset = os.open(path, os.O_RDONLY), 0
        while (n := os.preadv(fd, [view], offset)) > 0:
            offset += n
        os.close(fd)


def direct(files: list[str]) -> None:
    """O_DIRECT: from the disk into one reused aligned buffer, past the page cache (Linux)."""
    buffer = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT asks
    view = memoryview(buffer)
    for path in files:
        fd, offset = os.open(path, os.O_RDONLY | os.O_DIRECT), 0
        while (n := os.preadv(fd, [view], offset)) > 0:
            offset += n
        os.close(fd)
    view.release()
    buffer.close()


def advise_then_touch(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        os.close(fd)
    touch(files)


WAYS = {"read through a buffer": pread, "fadvise, then touch": advise_then_touch, "touch only": touch}
if hasattr(os, "O_DIRECT"):
    WAYS["O_DIRECT into a buffer, past the page cache"] = direct


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default="bench/.work/0.5b/*/*.safetensors")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    files = sorted(glob.glob(args.inputs))
    size = sum(os.path.getsize(f) for f in files)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            drop_caches()
            start, used = time.perf_counter(), os.times()
            way(files)
            now = os.times()
            runs.setdefault(name, []).append(
                {"wall": time.perf_counter() - start, "user": now.user - used.user, "system": now.system - used.system}
            )
    doc = provenance("read_ahead_ways.py", load_before) | {"input_bytes": size, "runs": runs}
    lines = [
        "# Bringing the inputs into the page cache, cold",
        "",
        f"{provenance_line(doc)}; {size / 1e9:.2f} GB in {len(files)} files. The touch loop is Python (its user time).",
        "",
        "| way | wall (s) | user (s) | system (s) |",
        "|---|---|---|---|",
        *[f"| {k} | {r['wall']:.2f} | {r['user']:.2f} | {r['system']:.2f} |" for k, rs in runs.items() for r in rs],
    ]
    write_results("read-ahead-ways", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
