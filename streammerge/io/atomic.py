"""Files that appear under their final name only complete and durable.

Every output file is written to a temporary name in the same folder, fsynced, renamed over
the final name, and the folder is fsynced: after a crash a final name is either absent or whole.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os

import torch

from ..errors import InputError, ResourceError
from .direct import OutputFile
from .safetensors_format import DTYPE_NAMES, build_header

TMP_SUFFIX = ".streammerge-tmp"


def temp_name(final_path: str, tag: str = "") -> str:
    """`tag`: a writer's own temporary name (a Ray task attempt), apart from any other writer's."""
    folder, name = os.path.split(final_path)
    return os.path.join(folder, f".{name}{'.' + tag if tag else ''}{TMP_SUFFIX}")


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(exc: OSError, path: str) -> Exception:
    """Map an OSError while writing `path` to the project error with the right exit code."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceError(f"{path}: no space left on the device ({exc.strerror})")
    if exc.errno == errno.EEXIST and os.path.isfile(path):
        return ResourceError(f"{path}: is a file, not a folder; give --out a folder to create or resume")
    return ResourceError(f"{path}: cannot write ({exc.strerror or exc})")


def write_bytes_atomic(final_path: str, data: bytes) -> None:
    tmp = temp_name(final_path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
        fsync_folder(os.path.dirname(final_path) or ".")
    except OSError as exc:
        _remove_quietly(tmp)
        raise os_error(exc, final_path) from None


def copy_atomic(src: str, final_path: str) -> None:
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror})") from None
    write_bytes_atomic(final_path, data)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class ShardWriter:
    """Streams one safetensors shard: header first (layout known up front), then each tensor.

    Only the tensor being written is in memory. `commit()` makes the shard appear under its
    final name; `abort()` removes the temporary file. Leaving a `with` block by an exception
    keeps the temporary file when `keep_on_error` (a resumable, checkpointed shard) and
    removes it otherwise.
    """

    keep_on_error = False

    def __init__(
        self,
        final_path: str,
        layout: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        resume: tuple[int, int] | None = None,
        background: bool = False,
        temp_tag: str = "",
    ):
        """`resume=(tensors, offset)`: continue a temporary file whose first `tensors` tensors
        (`offset` bytes, header included) were made durable by `checkpoint()`. `background`:
        hash and write each tensor on two threads while the caller computes the next (at most one
        tensor waits; an error surfaces at the next call)."""
        self.final_path = final_path
        self.tmp_path = temp_name(final_path, temp_tag)
        self.layout = layout
        self._next = 0
        self._sha = hashlib.sha256()
        self._file: OutputFile | None = None
        self._pending: list[concurrent.futures.Future] = []
        self._threads: list[concurrent.futures.ThreadPoolExecutor] = []  # the writer's and the hasher's
        self._error: BaseException | None = None
        self._background = background
        header, _ = build_header(layout, metadata)
        try:
            if resume is not None and self._continue(header, *resume):
                return
            self._file = OutputFile(self.tmp_path)
            self._put(header)
        except OSError as exc:
            self.abort()
            raise os_error(exc, final_path) from None

    def _continue(self, header: bytes, tensors: int, offset: int) -> bool:
        """Reopen the temporary file at `offset` if its header is ours; rehash its prefix."""
        if (
            not os.path.isfile(self.tmp_path)
            or os.path.getsize(self.tmp_path) < offset
            or not 0 <= tensors <= len(self.layout)
        ):
            return False
        with open(self.tmp_path, "rb") as f:
            if f.read(len(header)) != header:
                return False
            f.seek(0)
            remaining = offset
            while remaining:
                chunk = f.read(min(remaining, 16 * 1024 * 1024))
                if not chunk:
                    return False
                self._sha.update(chunk)
                remaining -= len(chunk)
        self._file = OutputFile(self.tmp_path, offset)
        self._next = tensors
        return True

    @property
    def tensors_written(self) -> int:
        return self._next

    def _wait(self) -> None:
        """Let the tensor being written in the background finish; re-raise its error here."""
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            self.abort()
            raise os_error(error, self.final_path) if isinstance(error, OSError) else error

    def checkpoint(self) -> int:
        """Make everything written so far durable; returns the byte offset it reaches."""
        self._wait()
        assert self._file is not None
        try:
            return self._file.sync()
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.final_path) from None

    def _put(self, data: bytes | memoryview) -> None:
        self._write(data)
        self._sha.update(data)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)

    def _guarded(self, step, data: memoryview) -> None:
        try:
            step(data)
        except BaseException as exc:  # noqa: BLE001 (re-raised on the caller's thread)
            self._error = exc

    def _join(self, stop: bool = False) -> None:
        """Wait for the tensor in the background; `stop`: and end the two threads."""
        concurrent.futures.wait(self._pending)
        self._pending.clear()
        if stop:
            for pool in self._threads:
                pool.shutdown()
            self._threads.clear()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.layout[self._next]
        if name != expected_name:
            raise AssertionError(f"shard layout expects {expected_name!r}, got {name!r}")
        if tuple(tensor.shape) != tuple(shape) or DTYPE_NAMES[tensor.dtype] != dtype:
            raise AssertionError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, layout says {shape} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._wait()
        self._next += 1
        if self._background:
            # hashing and writing on threads of their own, side by side: each is sequential, and
            # one after the other they took longer than computing the next tensor (0.47 s and
            # 0.35 s per GB; bench/results/README.md, "Round seven"). Two threads for the shard, not
            # two per tensor: starting a thread waits for it to run, 2-6 % of a merge's main thread.
            if not self._threads:
                self._threads = [
                    concurrent.futures.ThreadPoolExecutor(1, name) for name in ("shard-writer", "shard-hasher")
                ]
            for pool, step in zip(self._threads, (self._write, self._sha.update)):
                self._pending.append(pool.submit(self._guarded, step, memoryview(data)))
            return
        try:
            self._put(memoryview(data))
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.final_path) from None

    def commit(self) -> tuple[str, int]:
        """Finish the shard; returns (sha256 hex, size in bytes)."""
        self._wait()
        self._join(stop=True)
        if self._next != len(self.layout):
            raise AssertionError(f"{self.final_path}: {len(self.layout) - self._next} tensors not written")
        assert self._file is not None
        try:
            size = self._file.sync()
            self._file.close()
            self._file = None
            os.replace(self.tmp_path, self.final_path)
            fsync_folder(os.path.dirname(self.final_path) or ".")
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.final_path) from None
        return self._sha.hexdigest(), size

    def abort(self) -> None:
        self._join(stop=True)  # never close the file under the writing thread
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        _remove_quietly(self.tmp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._join(stop=True)
            if self.keep_on_error and self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None
            else:
                self.abort()
