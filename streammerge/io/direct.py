"""An output file written with direct I/O where the system allows it, through the page cache where not.

Why: a merge writes each output byte once and never reads it back. Through the page cache every
byte is first copied into a newly allocated page; on a virtual machine that backs guest memory on
first touch that copy can cost more CPU than the merge's arithmetic (bench/write_ways.py here:
256 MB took 0.13-1.32 s through the page cache, up to 1.2 s of it system time, and 0.10-0.15 s with
O_DIRECT, at most 0.03 s; bench/results/README.md, "Round four"), and
everywhere the written pages push the inputs out of the cache. O_DIRECT writes go to the device from
one reused, aligned buffer. Where the system refuses it (no O_DIRECT on macOS and Windows, tmpfs on
older kernels, a device with larger blocks), the file is written through the page cache as before.
The file's bytes are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in multiples of the block size
WRITE_BUFFER = 2 * 1024 * 1024  # the reused, page-aligned buffer of a direct file (1-16 MB wrote alike here)
USE_DIRECT = hasattr(os, "O_DIRECT")  # tests turn it off to compare the two ways


class OutputFile:
    """A file written sequentially: `write(data)`, `sync()` (everything so far durable; returns the
    size), `close()`. `OutputFile(path)` creates or truncates the file; `OutputFile(path, offset)`
    continues an existing one at `offset`, dropping what lies beyond it."""

    def __init__(self, path: str, offset: int | None = None):
        self.path = path
        self.direct = False
        self._file = None
        self._fd = -1
        if USE_DIRECT:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | (0 if offset else os.O_TRUNC), 0o644)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self._file = open(path, "r+b" if offset else "wb")
            if offset:
                self._file.truncate(offset)
                self._file.seek(offset)
            return
        self._buffer = mmap.mmap(-1, WRITE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # file offset of the buffer's first byte (a multiple of ALIGN)
        self._fill = 0  # bytes in the buffer, not all of them on the device yet
        if offset:
            self._start = offset - offset % ALIGN
            self._fill = offset - self._start
            with open(path, "rb") as f:  # the partial block: rewritten whole by the next write
                f.seek(self._start)
                self._view[: self._fill] = f.read(self._fill)
            os.ftruncate(self._fd, offset)

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while len(data) and self.direct:
            n = min(len(data), WRITE_BUFFER - self._fill)
            self._view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == WRITE_BUFFER:
                self._flush_whole()
        if len(data):  # through the page cache, from the start or since a fall-back
            self._file.write(data)  # type: ignore[union-attr]

    def _pwrite(self, length: int) -> None:
        """Write the buffer's first `length` bytes (a multiple of ALIGN) at its file offset."""
        done = 0
        while done < length:
            try:
                done += os.pwrite(self._fd, self._view[done:length], self._start + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._fall_back()  # the device's blocks are larger than ALIGN, or O_DIRECT is refused late
                return

    def _flush_whole(self) -> None:
        """Write the buffer's whole blocks; keep the partial one at its start."""
        whole = self._fill - self._fill % ALIGN
        if not whole:
            return
        self._pwrite(whole)
        if not self.direct:
            return
        rest = self._fill - whole
        self._view[:rest] = self._view[whole : self._fill]
        self._start += whole
        self._fill = rest

    def _fall_back(self) -> None:
        """Continue through the page cache: what the device holds is whole blocks before the buffer."""
        os.close(self._fd)
        self._fd = -1
        self.direct = False
        self._file = open(self.path, "r+b")
        self._file.truncate(self._start)
        self._file.seek(self._start)
        self._file.write(self._view[: self._fill])
        self._view = self._buffer = None  # freed once the caller's slices of it are gone

    def sync(self) -> int:
        if self.direct:
            self._flush_whole()
        if self.direct and self._fill:  # the last partial block, padded to a whole one, then cut back
            padded = self._fill + (-self._fill) % ALIGN
            self._view[self._fill : padded] = bytes(padded - self._fill)
            self._pwrite(padded)
        if not self.direct:  # from the start, or since a fall-back in the writes just above
            self._file.flush()  # type: ignore[union-attr]
            os.fsync(self._file.fileno())  # type: ignore[union-attr]
            return self._file.tell()  # type: ignore[union-attr]
        size = self._start + self._fill
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        return size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.direct:
            self._view.release()
            self._buffer.close()
            self.direct = False
