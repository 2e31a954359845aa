"""The memory plan: for every output tensor, where it is computed and the peak bytes it needs.

Each method states its peak as `memory(name, shape, n_experts, params, itemsize)` → `Need`
(fitted to measured peaks per method; tests/test_plan_budget.py checks the fit,
bench/results/memory-plan-vs-measured.md records it). The plan puts a
tensor on the GPU when its working set fits `--max-gpu-memory` (moving per-expert state such as
OrthoMerge's rotations to host RAM when only that does not fit), else on the CPU ("spill"), and
refuses before any work when the host peak — the process's anonymous memory at start plus the
largest tensor's host need — exceeds `--max-ram`, naming the smallest budget that would do.
Page cache from memory-mapped inputs is reclaimable and not counted (memwatch.py).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

import psutil
import torch

from .errors import ResourceError
from .io.direct import WRITE_BUFFER
from .units import format_size

RAM_MARGIN = 0.10  # default budgets leave this fraction of the free memory alone
PREFETCH_BUFFER = 16 * 1024 * 1024  # the read-ahead thread's reusable buffer (anonymous)
IO_BUFFERS = PREFETCH_BUFFER + WRITE_BUFFER  # and the output file's (io/direct.py)
# host memory the CUDA libraries take once cuBLAS and cuSOLVER have run (torch 2.11, H100:
# 335 MB from `import torch` to after a matmul, eigh, SVD, QR and solve; bench/cuda_host_memory.py)
CUDA_LIBRARIES_HOST = 335 * 1024 * 1024


@dataclass(frozen=True)
class Need:
    """Peak bytes of one tensor's merge: working set on the compute device, per-expert state
    that may live on the host instead, and what the method holds in host memory wherever it
    computes (bytes; neither of the last two counts in the working set)."""

    work: int
    state: int = 0
    transfer: int = 1 << 62  # elements loaded at once (row-block methods: one block)
    host: int = 0  # e.g. a tall OrthoMerge weight's merged residual, gathered in host RAM
    gpu_work: int | None = None  # the working set on a CUDA device, where it differs from `work`
    # host bytes more to compute two experts' parts at once on the CPU, each on one thread
    # (OrthoMerge's Procrustes solves): the plan adds them where they fit --max-ram (placement.py)
    side_by_side: int = 0

    @property
    def on_gpu(self) -> int:
        return self.work if self.gpu_work is None else self.gpu_work


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    device: str  # "cuda", "cpu", or "copy" (not merged: copied from the base)
    gpu_bytes: int
    host_bytes: int
    read_bytes: int
    write_bytes: int
    note: str = ""
    side_by_side: int = 0  # Need.side_by_side, counted in host_bytes: the method may use it


@dataclass
class Plan:
    tensors: list[TensorPlan]
    baseline: int  # anonymous memory of this process before merging
    ram_budget: int
    gpu_budget: int | None
    disk_free: int
    disk_needed: int
    extra_passes: int = 0  # statistics passes (re-read every input once each)
    statistics_read: int = 0  # bytes a pass over some tensors only re-reads (Method.plan_statistics)
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # what the user may change: said by plan and as a merge starts
    spilled: list[TensorPlan] = field(default_factory=list)  # merged on the CPU: too big for the GPU
    state_in_ram: list[TensorPlan] = field(default_factory=list)  # on the GPU, per-expert state in RAM
    read_buffers: int = 0  # the read-ahead's buffers for blocks it reads past the page cache (prefetch.py)

    @property
    def peak_host(self) -> int:
        return self.peak_host_of(self.tensors)

    def peak_host_of(self, tensors: list[TensorPlan]) -> int:
        """The host peak of a process that merges these tensors (a Ray task: one shard's)."""
        cuda = CUDA_LIBRARIES_HOST if any(t.device == "cuda" for t in tensors) else 0
        io = IO_BUFFERS + self.read_buffers
        return self.baseline + io + cuda + max((t.host_bytes for t in tensors), default=0)

    @property
    def peak_gpu(self) -> int:
        return max((t.gpu_bytes for t in self.tensors), default=0)

    @property
    def read_total(self) -> int:
        merged = sum(t.read_bytes for t in self.tensors)
        return merged * (1 + self.extra_passes) + self.statistics_read

    @property
    def write_total(self) -> int:
        return sum(t.write_bytes for t in self.tensors)

    def gpu_shortfall(self) -> str:
        """What the GPU budget left off the GPU, as the end of a log line ("" if nothing)."""
        spill = f" and spill {len(self.spilled)} tensor(s) to the CPU" if self.spilled else ""
        state = (
            f" and keep the per-expert state of {len(self.state_in_ram)} tensor(s) in RAM" if self.state_in_ram else ""
        )
        return spill + state

    def check(self) -> None:
        """Refuse before any work what cannot fit in RAM or on disk."""
        self.check_memory()
        self.check_disk()

    def check_memory(self) -> None:
        if self.peak_host > self.ram_budget:
            worst = max(self.tensors, key=lambda t: t.host_bytes)
            raise ResourceError(
                f"the merge needs {format_size(self.peak_host)} of RAM (tensor {worst.name!r} {list(worst.shape)} on "
                f"{worst.device}: "
                f"{format_size(worst.host_bytes)}, plus {format_size(self.peak_host - worst.host_bytes)} for the "
                "process); "
                f"--max-ram is {format_size(self.ram_budget)}: give at least --max-ram "
                f"{math.ceil(self.peak_host / 1e6)}MB"
            )

    def check_disk(self) -> None:
        if self.disk_needed > self.disk_free:
            raise ResourceError(
                f"the output needs {format_size(self.disk_needed)} more disk space, {format_size(self.disk_free)} is "
                "free"
            )

    def table(self, groups: bool = True) -> str:
        """Human-readable plan: one line per tensor kind (layer number folded), then totals."""
        rows: dict[tuple, list[TensorPlan]] = {}
        for t in self.tensors:
            key = (_kind(t.name), t.shape, t.device, t.note) if groups else (t.name, t.shape, t.device, t.note)
            rows.setdefault(key, []).append(t)
        width = min(max(len(key[0]) for key in rows), NAME_WIDTH)
        lines = [
            f"{'tensor':{width}s} {'count':>5s} {'shape':>16s} {'device':>6s} {'peak GPU':>10s} {'peak RAM':>10s} "
            f"{'read':>10s} {'written':>10s}"
        ]
        for (kind, shape, device, note), ts in rows.items():
            lines.append(
                f"{_fit(kind, width):{width}s} {len(ts):5d} {'x'.join(map(str, shape)) or 'scalar':>16s} {device:>6s} "
                f"{format_size(max(t.gpu_bytes for t in ts)):>10s} {format_size(max(t.host_bytes for t in ts)):>10s} "
                f"{format_size(sum(t.read_bytes for t in ts)):>10s} {format_size(sum(t.write_bytes for t in ts)):>10s}"
                + (f"  {note}" if note else "")
            )
        largest = max(self.tensors, key=lambda t: math.prod(t.shape))
        lines += [
            "",
            f"largest tensor: {largest.name} {list(largest.shape)}",
            f"peak RAM (anonymous): {format_size(self.peak_host)} of --max-ram {format_size(self.ram_budget)} "
            f"(process {format_size(self.baseline)} + read and write buffers "
            f"{format_size(IO_BUFFERS + self.read_buffers)}"
            + (
                f" + CUDA libraries {format_size(CUDA_LIBRARIES_HOST)}"
                if any(t.device == "cuda" for t in self.tensors)
                else ""
            )
            + " + largest working set)",
            f"peak GPU: {format_size(self.peak_gpu)}"
            + (
                f" of --max-gpu-memory {format_size(self.gpu_budget)}"
                if self.gpu_budget is not None
                else " (no GPU used)"
            ),
            f"tensors spilled to the CPU: {len(self.spilled)}"
            + (
                f" (on the GPU with their per-expert state in RAM: {len(self.state_in_ram)})"
                if self.state_in_ram
                else ""
            ),
            f"read: {format_size(self.read_total)}"
            + (f" ({self.extra_passes} statistics pass(es) re-read the inputs)" if self.extra_passes else "")
            + (
                f" ({format_size(self.statistics_read)} re-read to measure the data-dependent working sets)"
                if self.statistics_read
                else ""
            ),
            f"written: {format_size(self.write_total)}; disk needed {format_size(self.disk_needed)}, free "
            f"{format_size(self.disk_free)}",
            *self.notes,
            *self.hints,
        ]
        return "\n".join(lines)


NAME_WIDTH = 64  # the plan table's tensor column at most: longer names lose their start


def _fit(name: str, width: int) -> str:
    """`name`, or its end after "…" where it is longer than `width` (the end tells tensors apart)."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1 :]


def _kind(name: str) -> str:
    parts = name.split(".")
    return ".".join("N" if p.isdigit() else p for p in parts)


def default_ram_budget() -> int:
    return int(psutil.virtual_memory().available * (1 - RAM_MARGIN))


def default_gpu_budget() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free * (1 - RAM_MARGIN))


def existing_folder(path: str) -> str:
    """`path`, or its nearest ancestor that exists (an output folder not made yet)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def free_disk(folder: str) -> int:
    return shutil.disk_usage(existing_folder(folder)).free


def place(
    need: Need, numel: int, itemsize: int, use_gpu: bool, gpu_budget: int | None, out_bytes: int = 0
) -> tuple[str, int, int, str]:
    """(device, gpu bytes, host bytes, note) for one merged tensor; `out_bytes`: the result in
    the output dtype, held in host memory while its shard is written."""
    if use_gpu and gpu_budget is not None:
        transfer = min(numel, need.transfer) * itemsize  # loads pass through host memory a block at a time
        if need.on_gpu + need.state <= gpu_budget:
            return "cuda", need.on_gpu + need.state, 2 * transfer + need.host + out_bytes, ""
        if need.on_gpu <= gpu_budget:
            return (
                "cuda",
                need.on_gpu,
                2 * transfer + need.state + need.host + out_bytes,
                f"per-expert state ({format_size(need.state)}) kept in RAM",
            )
        return (
            "cpu",
            0,
            need.work + need.state + need.host + out_bytes,
            f"spilled: needs {format_size(need.on_gpu)} on the GPU",
        )
    return "cpu", 0, need.work + need.state + need.host + out_bytes, ""
