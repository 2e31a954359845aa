"""Placement: the memory plan of a merge (plan.py's rules applied to its tensors) and where each
tensor is computed.

The device of every merged tensor is journalled on the first run; a resumed merge and every Ray
task compute each tensor where that run did, so the output does not depend on the free memory
of the moment (GPU and CPU results may differ in the last bits).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .. import prefetch
from ..errors import ResourceError
from ..io.checkpoint import Checkpoint
from ..io.peft_oft import OftGenerators
from ..io.safetensors_format import DTYPES
from ..math import fused
from ..cpu import available_cores
from ..plan import Plan, TensorPlan, default_gpu_budget, default_ram_budget, free_disk, place
from ..memwatch import rss_anon
from ..methods.base import BLOCK_ELEMENTS
from ..units import format_size
from . import reads
from .inputs import MergeInputs
from .options import RunOptions

log = logging.getLogger(__name__)


def make_plan(inputs: MergeInputs, device: torch.device, options: RunOptions, statistics: dict | None = None) -> Plan:
    """Device and peak memory of every tensor under the budgets (see plan.py); `statistics`:
    what a plan_statistics method measured (then its tensors' needs are measured, not bounds)."""
    # before the tensors' needs: asking them imports numba (fused.runtime_bytes), which its allowance counts
    baseline = rss_anon()
    method = inputs.method
    use_gpu = device.type == "cuda"
    if options.assume_gpu:
        gpu_budget = min(options.max_gpu_memory or options.assume_gpu, options.assume_gpu)
    else:
        gpu_budget = (options.max_gpu_memory or default_gpu_budget()) if use_gpu else None
    ram_budget = options.max_ram or default_ram_budget()
    itemsize = torch.empty((), dtype=inputs.compute_dtype).element_size()
    n = len(inputs.experts)
    sources = (inputs.base, *inputs.experts)
    # read as stored by the fused kernels (TensorComputer.stored) where every input is a checkpoint
    # and fused.reads_stored says so for the tensor
    as_stored = method.stored_memory is not None and all(isinstance(src, Checkpoint) for src in sources)
    tensors, hints = [], []
    side_by_side: dict[str, int] = {}  # Need.side_by_side of the tensors computed on the CPU
    previous_out = 0
    for shard in inputs.shards:
        for t in shard.tensors:
            base_bytes = inputs.base.info(t.name).nbytes
            if not t.merged:  # copied from the base: the experts' copies are not read
                tensors.append(
                    TensorPlan(t.name, t.shape, "copy", 0, 2 * base_bytes + previous_out, base_bytes, t.nbytes)
                )
                previous_out = t.nbytes
                continue
            read = base_bytes + sum(e.info(t.name).nbytes for e in inputs.experts if isinstance(e, Checkpoint))
            params = inputs.values[t.name].params
            measured = statistics.get(t.name) if statistics else None
            generators = generators_of(inputs, t.name)
            if generators is not None:
                need = method.generators_memory(t.name, t.shape, n, params, itemsize, generators)
            elif measured is None:
                need = method.memory(t.name, t.shape, n, params, itemsize)
            else:
                need = method.memory(t.name, t.shape, n, params, itemsize, statistics=measured)
            numel = math.prod(t.shape)
            if as_stored:
                stored = [DTYPES.get(src.info(t.name).dtype) for src in sources]
                if fused.reads_stored(inputs.compute_dtype, device.type, stored, numel):  # type: ignore[arg-type]
                    # the kernels' rule (fused.rounds_into), and TensorTask.store_dtype's: not under --report
                    in_place = fused.rounds_into(DTYPES[t.dtype]) and options.report is None
                    need = method.stored_memory(t.name, t.shape, n, params, in_place) or need  # type: ignore[misc]
            if options.report is not None:
                # report.generic_stats, after the merge: per row block the N task vectors and their
                # stack, the base's and the result's rows and what it computes of them, in float64
                stats = (2 * n + 6) * min(numel, BLOCK_ELEMENTS) * 8
                gpu = None if need.gpu_work is None else need.gpu_work + stats
                need = dataclasses.replace(need, work=need.work + stats, gpu_work=gpu)
            # the result is held until written; the writer thread may still be writing the previous one
            placed, gpu_bytes, host_bytes, note = place(
                need, numel, itemsize, use_gpu, gpu_budget, t.nbytes + previous_out
            )
            previous_out = t.nbytes
            tensors.append(TensorPlan(t.name, t.shape, placed, gpu_bytes, host_bytes, read, t.nbytes, note))
            if placed == "cpu" and need.side_by_side:
                side_by_side[t.name] = need.side_by_side
    missing = fused.missing() if method.kernels is not None else None
    if missing and any(t.device == "cpu" and math.prod(t.shape) >= fused.MIN_ELEMENTS for t in tensors):
        hints.append(f"{method.name}: {missing}")
    passes = 0 if method.plan_statistics else method.statistics_passes(inputs.params)
    total = sum(s.nbytes for s in inputs.shards)
    plan = Plan(tensors, baseline, ram_budget, gpu_budget, free_disk(inputs.recipe.out), total, passes, hints=hints)
    if statistics and method.plan_statistics:
        plan.statistics_read = sum(t.read_bytes for t in tensors if t.name in statistics)
    elif measures_plan(inputs):
        plan.notes.append(
            f"{method.name}: upper bounds where the working set depends on the data "
            "(plan --measure measures them; a merge does when the bounds do not fit)"
        )
    # buffers for the blocks read past the page cache, where they fit; not where statistics passes
    # read every input through the page cache first: the merge then reads in place what it holds
    # (counted, they were a third of a small TIES merge's plan, and never filled)
    if prefetch.DIRECT and not method.statistics_passes(inputs.params):
        plan.read_buffers = reads.ring_bytes(reads.schedule(inputs.base, inputs.experts, inputs.shards, method,
                                                            inputs.values))  # fmt: skip
        if plan.read_buffers and plan.peak_host > ram_budget:
            plan.notes.append(
                f"inputs read through the page cache: the read-ahead's buffers ({format_size(plan.read_buffers)}) "
                "do not fit --max-ram"
            )
            plan.read_buffers = 0
    threads = options.task_threads if options.ray else options.threads or available_cores()
    if side_by_side and threads >= 2:
        count_side_by_side(plan, side_by_side, method.name)
    tensors = plan.tensors
    plan.spilled = [t for t in tensors if t.note and t.device == "cpu"]  # computed off the GPU
    plan.state_in_ram = [t for t in tensors if t.note and t.device == "cuda"]
    return plan


def generators_of(inputs: MergeInputs, name: str) -> OftGenerators | None:
    """A tensor's OFT experts' generators (their block geometry), where the method merges them."""
    if not inputs.generators:
        return None
    return OftGenerators(inputs.experts, name, inputs.compute_dtype, torch.device("cpu"))  # type: ignore[arg-type]


def count_side_by_side(plan: Plan, more: dict[str, int], method: str) -> None:
    """Each tensor's Need.side_by_side counted where the merge's peak with it fits --max-ram, after
    the read buffers: its method then computes two experts at once (TensorTask.side_by_side). The
    threads are those the run may take (a loaded machine may give it one: then the plan counts
    what is not used). Same bytes either way."""
    overhead = plan.peak_host - max(t.host_bytes for t in plan.tensors)
    counted = left = 0
    for i, t in enumerate(plan.tensors):
        if t.name in more:
            if overhead + t.host_bytes + more[t.name] <= plan.ram_budget:
                plan.tensors[i] = dataclasses.replace(t, host_bytes=t.host_bytes + more[t.name],
                                                      side_by_side=more[t.name])  # fmt: skip
                counted += 1
            else:
                left += 1
    if counted:
        plan.notes.append(f"{method}: {counted} tensor(s) computed two experts at a time, each on one thread "
                          "(their peak RAM counts both)")  # fmt: skip
    if left:
        budget = overhead + max(t.host_bytes + (0 if t.side_by_side else more.get(t.name, 0)) for t in plan.tensors)
        plan.hints.append(
            f"{method}: {left} tensor(s) compute one expert at a time to fit --max-ram; two at once (faster on "
            f"two or more threads) needs --max-ram {math.ceil(budget / 1e6)}MB"
        )


def measures_plan(inputs: MergeInputs) -> bool:
    """Whether this merge's plan has upper bounds a statistics pass can make tight."""
    method = inputs.method
    return method.plan_statistics and bool(method.statistics_passes(inputs.params)) and not inputs.generators


class Placement:
    """The plan of one merge and each tensor's device, as the first run (or the driver) decided."""

    def __init__(self, inputs: MergeInputs, device: torch.device, options: RunOptions):
        self.inputs, self.device, self.options = inputs, device, options
        self.replan()

    def replan(self, statistics: dict | None = None) -> None:
        self.plan = make_plan(self.inputs, self.device, self.options, statistics)
        self.tensors = {t.name: t for t in self.plan.tensors}

    def devices(self) -> dict[str, str]:
        """Where each merged tensor is computed: the journal records it, Ray tasks follow it."""
        return {name: t.device for name, t in self.tensors.items() if t.device != "copy"}

    def reuse(self, recorded: dict[str, str]) -> None:
        """Compute every tensor where the first run did: byte-identical output."""
        for name, device in recorded.items():
            placed = self.tensors.get(name)
            if placed is None or placed.device == device:
                continue
            if device == "cuda" and not torch.cuda.is_available():
                raise ResourceError(
                    f"{self.inputs.recipe.out}: this merge started on a GPU; resume it where CUDA is available (or "
                    "pass --restart)"
                )
            log.info("%s: computed on %s as in the first run (the plan now says %s)", name, device, placed.device)
            self.tensors[name] = dataclasses.replace(placed, device=device, side_by_side=0)

    def of_shard(self, names) -> dict[str, TensorPlan]:
        """The placement a Ray task receives for its shard's tensors."""
        return {n: self.tensors[n] for n in names}
