"""One merge per output folder: an advisory lock (flock) on the folder itself, with the
writer's pid in OUT/.streammerge.pid for the message the second merge prints. The OS drops the
lock when the process dies, so a killed merge never blocks its own resume."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ResumeError

PID_NAME = ".streammerge.pid"


class OutputLock:
    def __init__(self, folder: str):
        self.folder = folder
        self.pid_path = os.path.join(folder, PID_NAME)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                with open(self.pid_path) as f:
                    pid = f.read().strip() or "?"
            except OSError:
                pid = "?"
            raise ResumeError(
                f"{self.folder}: another merge (pid {pid}) is writing there; wait for it to finish or choose another "
                "folder"
            ) from None
        self.fd = fd
        with open(self.pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.remove(self.pid_path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


@contextmanager
def exclusive_file(f, path: str) -> Iterator[None]:
    """An open file held by this process alone (a download two merges might share)."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ResumeError(f"{path}: another process is writing it; wait for it to finish") from None
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
