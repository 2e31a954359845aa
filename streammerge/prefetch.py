"""Read-ahead: a background thread reads the inputs' next bytes while the current tensor is
computed and the previous one written, in the order the merge consumes them (engine/reads.py).

An item is read one of two ways:
- *hinted*: where the system has posix_fadvise (Linux), the kernel is asked to read the item's
  ranges into the page cache (WILLNEED), without copying them anywhere: copying every input byte
  into a buffer only to drop it cost 0.8-7.3 s of system time per 3.9 GB here, against 0.06 s
  (bench/read_ahead_ways.py; bench/results/README.md, "Round four"); the compute thread then reads
  them in place through a memory map. Elsewhere it reads through one small reusable buffer.
- *direct*: a group (a row block, or a whole tensor, from each input) read with O_DIRECT into one
  of a few reused, page-aligned buffers of `ring` bytes in all, past the page cache, and lent to
  the compute thread by `take` until it gives the bytes back (`give_back`): no page-cache pages are
  made and first touched (why: engine/reads.py), nor left behind. A group the page cache holds
  whole (inputs just downloaded, say) is left there and read in place, with no copy; where O_DIRECT
  is refused (no O_DIRECT on macOS and Windows, a file system without it), every item is hinted.

`take` never blocks a merge that the thread cannot serve: a piece it has not read and cannot
read now (its buffers all lent, or an error) is None, and the caller reads it through the map.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .io.direct import ALIGN
from .plan import PREFETCH_BUFFER

ADVISE = hasattr(os, "posix_fadvise")
DIRECT = hasattr(os, "O_DIRECT")  # tests turn it off to compare the two ways

Piece = tuple[str, int, int]  # (file, offset, length)


def aligned_span(offset: int, length: int) -> int:
    """Bytes of whole ALIGN blocks that hold [offset, offset + length)."""
    end = offset + length
    return (end + (-end) % ALIGN) - (offset - offset % ALIGN)


@dataclass(frozen=True)
class ReadItem:
    pieces: tuple[Piece, ...]
    direct: bool  # read into one buffer, each piece at an aligned place; else hinted
    # direct only: each piece a whole tensor, of which the consumer may take any rows, any number
    # of times, until it takes from a later item (else each piece is taken once, whole)
    whole: bool = False

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.pieces)

    @property
    def span(self) -> int:
        return sum(aligned_span(offset, n) for _, offset, n in self.pieces)


class _Pieces:
    """Which direct item's piece holds a range of a file: (j, k) of the piece containing it."""

    def __init__(self, items: list[ReadItem], groups) -> None:
        spans: dict[str, list[tuple[int, int, int, int]]] = {}
        for j in groups:
            for k, (path, offset, length) in enumerate(items[j].pieces):
                spans.setdefault(path, []).append((offset, offset + length, j, k))
        self._spans = {path: sorted(v) for path, v in spans.items()}
        self._starts = {path: [v[0] for v in vs] for path, vs in self._spans.items()}

    def find(self, key: Piece) -> tuple[int, int] | None:
        path, offset, length = key
        i = bisect.bisect_right(self._starts.get(path, ()), offset) - 1
        if i < 0:
            return None
        start, end, j, k = self._spans[path][i]
        return (j, k) if offset + length <= end else None


class _Group:
    """A direct item's buffer and state: waiting (not read yet), ready, failed (read through the
    map instead), or done (its buffer back in the pool)."""

    def __init__(self) -> None:
        self.state = "waiting"
        self.buffer: mmap.mmap | None = None
        self.places: list[int] = []  # per piece: its file's byte x is the buffer's byte places[k] + x
        self.lent = 0
        self.taken: set[int] = set()


class BufferPool:
    """Page-aligned buffers of at most `limit` bytes in all, reused: a buffer made once is touched
    once (not thread-safe: ReadAhead calls it under its lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.free: list[mmap.mmap] = []
        self.made = 0  # bytes of the buffers made and not closed

    def fits(self, size: int) -> bool:
        return any(len(b) >= size for b in self.free) or self.made - sum(map(len, self.free)) + size <= self.limit

    def get(self, size: int) -> mmap.mmap | None:
        """A free buffer of at least `size` bytes, or a new one where the limit allows; else None."""
        fitting = [b for b in self.free if len(b) >= size]
        if fitting:
            best = min(fitting, key=len)
            self.free.remove(best)
            return best
        while self.free and self.made + size > self.limit:
            self._close(self.free.pop())
        if self.made + size > self.limit:
            return None
        self.made += size
        # page-aligned, as O_DIRECT asks; private, so that it counts as this process's anonymous
        # memory (memwatch.py), as the plan counts it (a shared map counts as shmem)
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def put(self, buffer: mmap.mmap) -> None:
        self.free.append(buffer)

    def close(self, lent: list[mmap.mmap]) -> None:
        for b in self.free + lent:
            self._close(b)
        self.free = []

    def _close(self, buffer: mmap.mmap) -> None:
        self.made -= len(buffer)
        try:
            buffer.close()
        except BufferError:
            pass  # a view of it is still alive; the buffer goes when it does


class ReadAhead:
    """`ReadAhead(items, window, ring=...)`: items in consumption order; hinted items stay at most
    `window` bytes ahead of `advance(n)` calls from the consumer, direct ones within `ring` bytes
    of buffers (0: every item is hinted)."""

    def __init__(self, items: Iterable[ReadItem], window: int = 512 << 20, advise: bool = ADVISE, ring: int = 0):
        """`advise`: ask the kernel to read (posix_fadvise) rather than read through a buffer."""
        self.items = list(items)
        self.advise = advise
        self.window = window
        self.ring = ring if DIRECT else 0
        self.consumed = 0
        self.read = 0
        self.seconds = 0.0
        self.direct_bytes = 0  # read into buffers, and the seconds that took
        self.direct_seconds = 0.0
        self._cond = threading.Condition()
        self._stop = False
        self._finished = False
        self._groups = {j: _Group() for j, item in enumerate(self.items) if item.direct and self.ring}
        self._pieces = _Pieces(self.items, self._groups)
        self._position = -1  # the latest group the consumer took from
        self._pool = BufferPool(self.ring)
        self._lent: Counter = Counter()
        self._waiting = ""  # what the thread waits for: "window", "space" (of `_need` bytes) or ""
        self._need = 0
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def start(self) -> "ReadAhead":
        self._thread.start()
        return self

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self.consumed += nbytes
            self._cond.notify_all()

    def throughput(self) -> float | None:
        """Bytes per second read here (into buffers where any were); None where only hinted."""
        if self.direct_bytes:
            return self.direct_bytes / self.direct_seconds if self.direct_seconds > 0 else 0.0
        if self.advise:
            return None
        return self.read / self.seconds if self.seconds > 0 else 0.0

    # the consumer's side

    def take(self, key: Piece) -> memoryview | None:
        """The bytes of `key` (a piece of a direct item, or rows of a whole one) in a buffer, lent
        until `give_back(key)`; None where they are not there to lend (then read them elsewhere)."""
        found = self._pieces.find(key)
        if found is None:
            return None
        j, k = found
        with self._cond:
            group = self._groups[j]
            if j > self._position:  # the consumer has moved on: earlier groups are not wanted again
                for i in range(max(self._position, 0), j):
                    if i in self._groups:
                        self._recycle(i, passed=True)
                self._position = j
                self._cond.notify_all()
            while group.state == "waiting" and not self._finished and not self._stalled():
                self._cond.wait()
            if group.state != "ready":
                return None
            group.lent += 1
            group.taken.add(k)
            self._lent[key] += 1
            start = group.places[k] + key[1]
            return memoryview(group.buffer)[start : start + key[2]]  # type: ignore[arg-type]

    def give_back(self, key: Piece) -> bool:
        """End the loan of `key`'s bytes; False where they were not lent by `take`."""
        with self._cond:
            if not self._lent[key]:
                return False
            self._lent[key] -= 1
            j, _ = self._pieces.find(key)  # type: ignore[misc]
            self._groups[j].lent -= 1
            self._recycle(j, passed=j < self._position)
            return True

    def _recycle(self, j: int, passed: bool) -> None:
        """Return group j's buffer to the pool once nothing of it is lent and nothing more will be
        taken (the consumer has passed it, or taken every piece). Under the lock."""
        group = self._groups[j]
        if group.state == "waiting" and passed:
            group.state = "done"  # not read: the consumer no longer wants it
            return
        complete = len(group.taken) == len(self.items[j].pieces) and not self.items[j].whole
        if group.state != "ready" or group.lent or not (passed or complete):
            return
        self._pool.put(group.buffer)  # type: ignore[arg-type]
        group.buffer, group.state = None, "done"
        self._cond.notify_all()

    def _stalled(self) -> bool:
        """The thread waits for something only the consumer can give: read elsewhere instead."""
        space = self._waiting == "space" and not self._pool.fits(self._need)
        return space or (self._waiting == "window" and self.read - self.consumed > self.window)

    # the thread

    def _run(self) -> None:
        view = memoryview(bytearray(0 if self.advise else PREFETCH_BUFFER))
        fds: dict[str, int] = {}
        direct_fds: dict = {}
        direct_ok = True
        cache = PageCache() if self._groups else None
        try:
            for j, item in enumerate(self.items):
                group = self._groups.get(j)
                if group is not None and direct_ok:
                    direct_ok = self._read_group(j, item, group, direct_fds, cache)  # type: ignore[arg-type]
                    if direct_ok:
                        continue
                if group is not None:  # O_DIRECT refused: hinted, read through the map
                    with self._cond:
                        group.state = "failed"
                        self._cond.notify_all()
                with self._cond:
                    while not self._stop and self.read - self.consumed > self.window:
                        self._waiting = "window"
                        self._cond.notify_all()
                        self._cond.wait(0.1)
                    self._waiting = ""
                    if self._stop:
                        return
                self.seconds += hint(item.pieces, fds, view if not self.advise else None)
                with self._cond:
                    self.read += item.nbytes
        except OSError:
            return  # read-ahead is an optimisation; the compute thread reports real errors
        finally:
            with self._cond:
                self._finished = True
                for group in self._groups.values():
                    if group.state == "waiting":
                        group.state = "failed"
                self._cond.notify_all()
            for fd in (*fds.values(), *direct_fds.values()):
                os.close(fd)
            if cache is not None:
                cache.close()

    def _read_group(self, j: int, item: ReadItem, group: _Group, fds: dict, cache: PageCache) -> bool:
        """Read direct item j into a buffer; False where O_DIRECT is refused (then hint the rest).
        An item the page cache holds whole is left there (state "cached"): the consumer reads it
        in place, with no copy; a piece it holds is copied from it, not read from the disk."""
        held = [cache.holds(path, offset, length) for path, offset, length in item.pieces]
        with self._cond:
            while True:
                if self._stop or j < self._position or all(held) or not item.span:
                    unwanted = self._stop or j < self._position
                    group.state = "done" if unwanted or group.state != "waiting" else "cached"
                    self.read += item.nbytes
                    self._cond.notify_all()
                    return True
                buffer = self._pool.get(item.span)
                if buffer is not None:
                    break
                self._waiting, self._need = "space", item.span
                self._cond.notify_all()
                self._cond.wait(0.1)
            self._waiting = ""
        started = time.perf_counter()
        try:
            places, ok = read_pieces(buffer, item.pieces, held, fds, cache)
        except OSError as exc:
            with self._cond:
                self._pool.put(buffer)
            if exc.errno == errno.EINVAL:
                return False  # O_DIRECT refused here: hint this item and every later one
            raise
        with self._cond:
            self.direct_seconds += time.perf_counter() - started
            self.direct_bytes += item.nbytes
            self.read += item.nbytes
            group.buffer, group.places = buffer, places
            group.state = "ready" if ok else "failed"
            if not ok:
                group.buffer = None
                self._pool.put(buffer)
            elif j < self._position:
                self._recycle(j, passed=True)
            self._cond.notify_all()
        return True

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            lent = [g.buffer for g in self._groups.values() if g.buffer is not None]
            for group in self._groups.values():
                group.buffer = None
                group.state = "done" if group.state == "ready" else group.state
            self._pool.close(lent)


def hint(pieces, fds: dict[str, int], view: memoryview | None) -> float:
    """Have the kernel read the pieces into the page cache: asked (posix_fadvise), or, with a
    `view` (no posix_fadvise here), read through it; the seconds that took."""
    started = time.perf_counter()
    for path, offset, length in pieces:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        if view is None:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            continue
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
            if n <= 0:
                break
            offset += n
    return time.perf_counter() - started


def read_pieces(buffer: mmap.mmap, pieces, held: list[bool], fds: dict, cache: PageCache) -> tuple[list[int], bool]:
    """Read each piece into `buffer`, at the next ALIGN boundary after the previous one's aligned
    blocks (O_DIRECT, from fds[path]; a piece the page cache holds, `held`, copied from there);
    (per piece, p such that its file's byte x is the buffer's byte p + x; every byte read: False
    where a file ended early)."""
    places, place, ok = [], 0, True
    target = memoryview(buffer)
    try:
        for (path, offset, length), cached in zip(pieces, held):
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
            start, span = offset - offset % ALIGN, aligned_span(offset, length)
            if cached:  # a copy from the page cache, alignment free
                fd, begin, need = cache.fd(path), offset, length
            else:
                fd, begin, need = fds[path], start, offset + length - start
            got = 0
            while got < need:
                n = os.preadv(fd, [target[place + begin - start + got : place + span]], begin + got)
                if n <= 0:
                    break
                got += n
            ok = ok and got >= need  # short: the file changed; the map's read then says so
            places.append(place - start)
            place += span
    finally:
        target.release()
    return places, ok


class PageCache:
    """Which bytes of a file the page cache holds, asked without reading them (mincore(2) on a map
    of the file: a read that misses, even RWF_NOWAIT's, starts the kernel's own read-ahead)."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, mmap.mmap, int]] = {}  # path -> (fd, map, its address)
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            self._mincore, self._ctypes = libc.mincore, ctypes
        except (OSError, AttributeError, TypeError):
            self._mincore = None  # then nothing counts as held: every piece is read

    def fd(self, path: str) -> int:
        return self._open(path)[0]

    def holds(self, path: str, offset: int, length: int) -> bool:
        """Every page of [offset, offset + length) is in the page cache."""
        if self._mincore is None or length <= 0:
            return False
        try:
            _, mm, address = self._open(path)
        except (OSError, ValueError):
            return False
        start = offset - offset % mmap.PAGESIZE
        end = min(len(mm), offset + length)
        if end <= start:
            return False
        pages = self._ctypes.create_string_buffer((end - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        if self._mincore(self._ctypes.c_void_p(address + start), end - start, pages) != 0:
            return False
        return pages.raw.count(1) == len(pages)  # each byte 1 where the page is held (other bits: not held)

    def _open(self, path: str) -> tuple[int, mmap.mmap, int]:
        found = self._files.get(path)
        if found is None:
            fd = os.open(path, os.O_RDONLY)
            # private (copy-on-write) so that ctypes may take its address; nothing writes to it
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            address = self._ctypes.addressof(self._ctypes.c_char.from_buffer(mm)) if self._mincore else 0
            found = self._files[path] = (fd, mm, address)
        return found

    def close(self) -> None:
        for fd, mm, _ in self._files.values():
            try:
                mm.close()
            except BufferError:
                pass
            os.close(fd)
        self._files.clear()
