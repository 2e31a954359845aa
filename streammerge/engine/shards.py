"""The shard loop: each output shard's tensors computed in order and streamed into the shard file,
which is committed atomically under its final name; and the local executor that runs it.

Resume works per shard: a shard is either finished (durable, in the journal) or continued from
its last checkpoint, and every tensor's result depends only on the inputs and its name, so a
resumed output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..io.atomic import ShardWriter
from ..io.checkpoint import Checkpoint
from ..io.journal import Journal
from ..math import fused
from ..prefetch import ReadAhead
from ..units import format_duration, format_size
from .inputs import Shard
from . import reads
from .statistics import local_map_pass
from .tensors import TensorComputer

log = logging.getLogger(__name__)


class Progress:
    """Output bytes done (inside long tensors too, as their methods report) and the rate at which
    inputs are consumed: a bar on a terminal, a log line every LOG_SECONDS elsewhere (no carriage
    returns in a log file). `initial`: bytes a resumed merge had done, which count as done, not
    as throughput."""

    LOG_SECONDS = 30.0

    def __init__(self, total: int, initial: int, desc: str, quiet: bool):
        self.total, self.initial, self.n, self.desc, self.quiet = total, initial, initial, desc, quiet
        self.consumed, self.credited = 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        self._logs_above = ExitStack()
        if not quiet and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc, smoothing=0.1)
            # a log line during the merge (compiling kernels, a resumed shard) goes above the bar,
            # not onto its line
            self._logs_above.enter_context(logging_redirect_tqdm())

    def _add(self, nbytes: int) -> None:
        self.n += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif not self.quiet and time.monotonic() - self.last_line >= self.LOG_SECONDS:
            self.last_line = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = f", about {format_duration((self.total - self.n) / rate)} left" if rate > 0 else ""
        share = 100 * self.n / self.total if self.total else 100.0
        return f"{self.desc}: {format_size(self.n)} of {format_size(self.total)} ({share:.0f} %){left}"

    def within(self, nbytes: int) -> Callable[[float], None]:
        """A callback for the fraction of the next tensor (of `nbytes` output) its method has done."""
        self.credited = 0

        def on_fraction(fraction: float) -> None:
            want = int(fraction * nbytes)
            if want > self.credited:
                self._add(want - self.credited)
                self.credited = want

        return on_fraction

    def done(self, out_bytes: int, read_bytes: int) -> None:
        self._add(out_bytes - self.credited)
        self.credited = 0
        self.consumed += read_bytes
        if self.bar is not None:
            rate = self.consumed / max(time.monotonic() - self.started, 1e-9) / 1e6
            self.bar.set_postfix_str(f"inputs {rate:.0f} MB/s", refresh=False)

    def close(self) -> None:
        self._logs_above.close()
        if self.bar is not None:
            self.bar.close()


def resumed_bytes(shards: list[Shard], partial: dict | None) -> int:
    """Output bytes of the tensors a partial shard already holds (the journal's `partial`)."""
    shard = next((s for s in shards if partial and s.filename == partial["shard"]), None)
    return sum(t.nbytes for t in shard.tensors[: partial["tensors"]]) if shard is not None else 0  # type: ignore[index]


def start_read_ahead(computer: TensorComputer, shards: list[Shard]) -> ReadAhead:
    """The read-ahead of the shards' inputs (engine/reads.py), lending what it reads into buffers
    to the open checkpoints until `stop_read_ahead`."""
    job = computer.job
    items = reads.schedule(computer.base, computer.experts, shards, computer.method, job.values)
    ring = job.read_buffers if reads.ring_bytes(items) <= job.read_buffers else 0
    ahead = ReadAhead(items, ring=ring).start()
    for src in (computer.base, *computer.experts):
        if isinstance(src, Checkpoint):
            src.reader = ahead
    return ahead


def stop_read_ahead(computer: TensorComputer, ahead: ReadAhead) -> None:
    for src in (computer.base, *computer.experts):
        if isinstance(src, Checkpoint):
            src.reader = None
    ahead.stop()


def write_shard(
    computer: TensorComputer,
    shard: Shard,
    statistics,
    out: str,
    journal: Journal | None = None,
    progress: Progress | None = None,
    read_ahead: ReadAhead | None = None,
    temp_tag: str = "",
    checkpoint_seconds: float = 10.0,
) -> tuple[str, int]:
    """Merge the tensors of `shard` and write it atomically under its final name; (sha256, size).

    With a journal, progress inside the shard is made durable every `checkpoint_seconds` and a
    recorded partial shard is continued; without one (a Ray task) the shard is written from its
    start to a temporary name of its own (`temp_tag`), so that a retried or orphaned attempt
    never writes into another's file."""
    layout = [(t.name, t.dtype, t.shape) for t in shard.tensors]
    partial = (
        journal.partial
        if journal is not None and journal.partial and journal.partial["shard"] == shard.filename
        else None
    )
    resume = (partial["tensors"], partial["offset"]) if partial else None
    read_bytes = {n: p.read_bytes for n, p in computer.job.placement.items()}
    path = os.path.join(out, shard.filename)
    with ShardWriter(path, layout, {"format": "pt"}, resume=resume, background=True, temp_tag=temp_tag) as writer:
        writer.keep_on_error = journal is not None  # what a checkpoint made durable survives an interrupt
        done = writer.tensors_written
        if done:  # the progress counted these as done when it started (resumed_bytes)
            log.info("%s: resuming after %d of its %d tensors", shard.filename, done, len(shard.tensors))
            if read_ahead is not None:
                read_ahead.advance(sum(read_bytes[t.name] for t in shard.tensors[:done]))
        last_checkpoint = time.monotonic()
        for t in shard.tensors[done:]:
            writer.write(t.name, computer.merge(t, statistics, progress.within(t.nbytes) if progress else None))
            if read_ahead is not None:
                read_ahead.advance(read_bytes[t.name])
            if progress is not None:
                progress.done(t.nbytes, read_bytes[t.name])
            due = time.monotonic() - last_checkpoint >= checkpoint_seconds
            if journal is not None and due and writer.tensors_written < len(layout):
                journal.partial = {
                    "shard": shard.filename,
                    "tensors": writer.tensors_written,
                    "offset": writer.checkpoint(),
                }
                journal.save()
                last_checkpoint = time.monotonic()
        return writer.commit()


class LocalExecutor:
    """Merges the unfinished shards in this process, in order, reading ahead of the computation."""

    label = ""
    continues_partial_shard = True  # a shard checkpointed mid-way is continued, not rewritten

    def __init__(self, computer: TensorComputer, shards: list[Shard], out: str, checkpoint_seconds: float, quiet: bool):
        self.computer, self.shards, self.out = computer, shards, out
        self.checkpoint_seconds, self.quiet = checkpoint_seconds, quiet
        self.read_ahead: ReadAhead | None = None
        self.compiled_before = 0.0

    def start(self) -> None:
        self.compiled_before = fused.compile_seconds()

    def check_resources(self, shards: list[Shard]) -> None:
        pass  # the plan checked this machine

    def map_pass(self, fn, *args) -> list:
        """The whole model in one part (statistics.py)."""
        tensors = [t for s in self.shards for t in s.tensors]
        return local_map_pass(self.computer, tensors, not self.quiet)(fn, *args)

    def merge(
        self, todo: list[Shard], journal: Journal, progress: Progress, check_inputs: Callable[[], None], statistics
    ) -> int:
        """Every shard in `todo`, each journalled once durable; bytes written."""
        self.read_ahead = start_read_ahead(self.computer, todo)
        written = 0
        try:
            for shard in todo:
                check_inputs()
                sha, size = write_shard(
                    self.computer, shard, statistics, self.out, journal, progress, self.read_ahead,
                    checkpoint_seconds=self.checkpoint_seconds,
                )  # fmt: skip
                journal.finished[shard.filename] = {"sha256": sha, "size": size}
                journal.partial = None
                journal.save()
                written += size
        finally:
            stop_read_ahead(self.computer, self.read_ahead)
        return written

    def stats(self) -> tuple[int, float | None, float]:
        """Bytes the read-ahead thread read (or asked the kernel to), its rate (None: not measured),
        and the seconds numba spent compiling kernels since `start`."""
        read, rate = (self.read_ahead.read, self.read_ahead.throughput()) if self.read_ahead else (0, None)
        return read, rate, fused.compile_seconds() - self.compiled_before

    def stop(self) -> None:
        fused.release()  # the histograms kept from tensor to tensor: not past this merge
