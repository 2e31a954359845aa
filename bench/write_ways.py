#!/usr/bin/env python3
"""What touching new memory and writing an output cost on this machine (io/direct.py, allocator.py):
256 MB of new anonymous memory touched the first time and again; 256 MB written to a new file
through the page cache; the same written with O_DIRECT from one reused aligned buffer of 1-16 MB.
Wall and system seconds each; the file is fsynced and removed after each write.

    python bench/write_ways.py [--folder bench/.work] [--repeats 3]

Results: bench/results/write-ways.{json,md}.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, provenance_line, write_results  # noqa: E402

SIZE = 256 * 1024 * 1024


def timed(fn) -> dict:
    start, used = time.perf_counter(), os.times()
    fn()
    now = os.times()
    return {"wall": time.perf_counter() - start, "system": now.system - used.system}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = os.path.join(args.folder, "write-ways.tmp")
    data = memoryview(os.urandom(SIZE))
    runs: dict[str, list[dict]] = {}
    load_before = os.getloadavg()

    def add(name: str, row: dict) -> None:
        runs.setdefault(name, []).append(row)

    def buffered() -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def direct(buffer: mmap.mmap) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        for offset in range(0, SIZE, len(buffer)):
            buffer[:] = data[offset : offset + len(buffer)]
            os.pwrite(fd, buffer, offset)
        os.fsync(fd)
        os.close(fd)

    for _ in range(args.repeats):
        block = mmap.mmap(-1, SIZE)
        add("new memory, first touch", timed(lambda: block.write(bytes(data))))  # noqa: B023
        block.seek(0)
        add("the same memory, again", timed(lambda: block.write(bytes(data))))  # noqa: B023
        block.close()
        add("new file, page cache", timed(buffered))
        os.remove(path)
        for mb in (1, 2, 4, 16):
            buffer = mmap.mmap(-1, mb * 1024 * 1024)
            add(f"new file, O_DIRECT, {mb} MB buffer", timed(lambda: direct(buffer)))  # noqa: B023
            os.remove(path)
    doc = provenance("write_ways.py", load_before) | {"bytes": SIZE, "runs": runs}
    lines = [
        "# Touching new memory and writing an output, 256 MB each",
        "",
        f"{provenance_line(doc)}. Writes include the fsync.",
        "",
        "| way | wall (s) | system (s) |",
        "|---|---|---|",
        *[f"| {k} | {r['wall']:.3f} | {r['system']:.2f} |" for k, rs in runs.items() for r in rs],
    ]
    write_results("write-ways", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
