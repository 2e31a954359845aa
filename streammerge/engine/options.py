"""How a merge runs, as one frozen value: device, budgets, resume, report, threads, executor.

The recipe says what is merged; these options say how and where. The same value is what a Ray
task receives. None of them changes the merged bytes except `device` (GPU and CPU results may
differ in the last bits; the journal pins each tensor's device, see placement.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ResourceError, UsageError


@dataclass(frozen=True)
class RunOptions:
    device: str = "auto"  # auto, cpu or cuda
    max_ram: int | None = None  # bytes of anonymous memory (None: 90 % of what is available)
    max_gpu_memory: int | None = None  # bytes (None: 90 % of the GPU's free memory)
    assume_gpu: int | None = None  # plan only: as if a CUDA device with this much free memory were present
    restart: bool = False  # discard a previous merge of other inputs in the output folder
    quiet: bool = False  # no progress bars
    checkpoint_seconds: float = 10.0  # how often progress inside a shard is made durable
    report: str | None = None  # path of the --report diagnostics file
    threads: int | None = None  # CPU threads (the CLI picks the free cores; a Ray task uses this many, default 1)
    ray: str | None = None  # None: merge in this process; else "local", "auto" or a cluster address

    @property
    def task_threads(self) -> int:
        """CPUs one Ray task asks for and uses."""
        return self.threads or 1


def check_output_file(path: str | None, flag: str) -> None:
    """A file the run will write, refused before any work (exit 2) where it cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def compute_device(options: RunOptions) -> torch.device:
    """The device a merge computes on (`assume_gpu`: the GPU being planned for)."""
    return torch.device("cuda") if options.assume_gpu else resolve_device(options.device)
