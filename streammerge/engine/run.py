"""One merge run: inputs → placement → output folder → executor → shard loop → index.

SIGINT and SIGTERM anywhere leave a resumable state: rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import Interrupted, UsageError
from ..io.atomic import os_error
from ..io.checkpoint import INDEX_NAME
from ..io.journal import Journal
from ..io.lock import OutputLock
from ..allocator import return_freed_memory_to_os
from ..memwatch import PeakSampler
from ..plan import Plan, free_disk
from ..units import format_size
from . import output
from .inputs import open_merge
from .options import RunOptions, check_output_file, compute_device
from .placement import Placement, measures_plan
from .remote import RemoteInputs
from .shards import LocalExecutor, Progress, resumed_bytes
from .statistics import merge_statistics, plan_statistics
from .tensors import TensorComputer, TensorJob

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    out: str
    shards: int
    shards_resumed: int
    bytes_written: int
    seconds: float
    device: str
    threads: int = 1  # CPU threads the arithmetic ran on
    planned_peak_ram: int = 0
    measured_peak_ram: int = 0  # anonymous memory, sampled
    bytes_read_ahead: int = 0
    read_throughput: float | None = None  # bytes/s of the read-ahead thread; None: not measured
    compile_seconds: float = 0.0  # numba compiling kernels (math/fused.py), part of `seconds`


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the current shard is abandoned cleanly, the merge resumable."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, handler) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Merge:
    """A validated, planned merge of one recipe under one set of run options."""

    def __init__(self, recipe, options: RunOptions = RunOptions()):
        if options.ray is not None and options.report is not None:  # refused before anything is written
            raise UsageError("--report records diagnostics in one process: merge without --ray to write it")
        self.options = options
        check_output_file(options.report, "--report")
        self.report = None
        if options.report is not None:
            from ..report import ReportWriter

            self.report = ReportWriter(options.report)
        if options.max_ram is not None:
            # an explicit budget is a promise: keep allocator slack out of it (costs some speed on
            # models made of many mid-sized tensors, so only when asked)
            return_freed_memory_to_os()
        self.device = compute_device(options)
        self.remote = RemoteInputs(recipe, options.quiet)  # Hub repo ids: resolved, headers read, nothing downloaded
        self._open(self.remote.planning)

    def _open(self, recipe) -> None:
        self.inputs = None
        try:
            with self.remote.named():
                self.inputs = open_merge(recipe, self.device.type)
                self.placement = Placement(self.inputs, self.device, self.options)
        except BaseException:
            self.close()
            raise

    def download_inputs(self) -> None:
        """Hub inputs checked and planned from their headers: their weights now, checked again."""
        if self.remote.planning is not self.remote.recipe:
            self.remote.check_disk(self.inputs.recipe.out, sum(s.nbytes for s in self.shards))
            recipe = self.remote.fetch(self.options.quiet)
            self.close()
            self._open(recipe)

    @property
    def plan(self) -> Plan:
        return self.placement.plan

    @property
    def shards(self):
        return self.inputs.shards

    def job(self) -> TensorJob:
        i = self.inputs
        return TensorJob(
            i.method.name, i.values, dict(self.placement.tensors), i.compute_dtype, i.generators,
            i.recipe.seed, i.recipe.allow_nonfinite, bool(self.options.assume_gpu), self.plan.read_buffers,
        )  # fmt: skip

    def computer(self) -> TensorComputer:
        return TensorComputer(self.job(), self.inputs.base, self.inputs.experts, self.report)

    def measures_plan(self) -> bool:
        return measures_plan(self.inputs)

    def measure_statistics(self):
        """The pass a plan_statistics method needs (OrthoMerge-C: conflicting rows of wide weights)."""
        return plan_statistics(self.inputs, self.computer(), not self.options.quiet)

    def estimate(self):
        """How long this merge will take here (engine/estimate.py)."""
        from .estimate import calibrate, estimate

        plan = self.plan
        read = sum(t.read_bytes for t in plan.tensors) * (1 + plan.extra_passes) + plan.statistics_read
        paired = frozenset(t.name for t in plan.tensors if t.side_by_side)
        return estimate(self.inputs, read, calibrate(self.inputs, self.device), paired)

    def plan_with(self, statistics) -> None:
        self.placement.replan(statistics)

    def tighten_plan(self, journal: Journal) -> None:
        """Where the upper-bound plan does not fit (RAM, or a tensor spilled off the GPU), measure
        what the working sets depend on, once (journalled: a resume plans the same), and replan."""
        if not self.measures_plan():
            return
        fresh = journal.statistics is None
        if fresh:
            if self.plan.peak_host <= self.plan.ram_budget and not self.plan.gpu_shortfall():
                return
            log.info("the plan's upper bounds need %s of RAM%s: measuring the data-dependent working sets (one "
                     "read of those tensors)", format_size(self.plan.peak_host), self.plan.gpu_shortfall())  # fmt: skip
            journal.statistics = self.measure_statistics()
        self.plan_with(journal.statistics)
        if fresh:  # the counts and the placement they give, together
            journal.placement = self.placement.devices()
            journal.save()
        else:
            self.placement.reuse(journal.placement)

    def executor(self):
        if self.options.ray is None:
            return LocalExecutor(self.computer(), self.shards, self.inputs.recipe.out, self.options.checkpoint_seconds,
                                 self.options.quiet)  # fmt: skip
        from .ray import RayExecutor

        return RayExecutor(self.inputs.recipe, self.options, self.job(), self.shards, self.plan)

    def run(self) -> MergeReport:
        """Merge (or resume); SIGINT/SIGTERM anywhere leave a resumable state and raise Interrupted."""
        if self.options.assume_gpu:
            raise UsageError("--assume-gpu plans only; merge on a machine that has the GPU")
        import torch

        from ..cpu import choose_threads

        torch.set_num_threads(choose_threads(self.options.threads))  # the free cores, as from the CLI
        if not self.measures_plan():  # else the bounds may tighten once measured (tighten_plan)
            self.plan.check_memory()  # before the output folder is touched
        with sigterm_as_interrupt():
            try:
                self.download_inputs()
                with PeakSampler() as sampler:
                    try:
                        os.makedirs(self.inputs.recipe.out, exist_ok=True)
                    except OSError as exc:
                        raise os_error(exc, self.inputs.recipe.out) from None
                    with OutputLock(self.inputs.recipe.out):
                        report = self._run_locked()
                report.planned_peak_ram = self.plan.peak_host
                report.threads = torch.get_num_threads()
                report.measured_peak_ram = sampler.peak
                return report
            except KeyboardInterrupt:
                raise Interrupted(
                    "interrupted; the finished shards are kept — rerun the same command to resume"
                ) from None

    def _run_locked(self) -> MergeReport:
        started = time.monotonic()
        inputs, out = self.inputs, self.inputs.recipe.out
        journal = output.prepare(inputs, self.placement, self.options.restart)
        shards = inputs.shards
        if journal.complete and os.path.exists(os.path.join(out, INDEX_NAME)):
            log.info("%s: already complete", out)
            return MergeReport(out, len(shards), len(shards), 0, 0.0, self.device.type)
        todo = [s for s in shards if s.filename not in journal.finished]
        if todo:
            self.tighten_plan(journal)
        self.plan.disk_needed = sum(s.nbytes for s in todo)
        self.plan.disk_free = free_disk(out)
        self.plan.check()
        for line in [f"{t.name}: {t.note}" for t in self.plan.spilled + self.plan.state_in_ram] + self.plan.hints:
            log.info("%s", line)
        executor = self.executor()
        executor.start()
        try:
            executor.check_resources(todo)  # before any work, as the local plan check
            if inputs.method.whole_model_statistics(inputs.params) and journal.statistics is None and todo:
                journal.statistics = merge_statistics(inputs, executor.map_pass)
                journal.save()
            statistics = None if inputs.method.plan_statistics else journal.statistics  # plan-only: no merge
            watch = output.InputWatch(inputs)
            total = sum(s.nbytes for s in shards)
            done = total - sum(s.nbytes for s in todo)
            if executor.continues_partial_shard:
                done += resumed_bytes(todo, journal.partial)
            desc = f"merging ({inputs.method.name}, {self.device.type}{executor.label})"
            progress = Progress(total, done, desc, self.options.quiet)
            try:
                written = executor.merge(todo, journal, progress, watch.check, statistics)
            finally:
                progress.close()
        finally:
            executor.stop()
        output.finish(inputs, journal, self.report)
        report = MergeReport(
            out, len(shards), len(shards) - len(todo), written, time.monotonic() - started, self.device.type
        )
        report.bytes_read_ahead, report.read_throughput, report.compile_seconds = executor.stats()
        return report

    def close(self) -> None:
        if self.inputs is not None:
            self.inputs.close()
        self.remote.close()
