"""Helpers the benchmark scripts share: dropping the page cache, loading a model folder whole."""
from __future__ import annotations

import os
import subprocess

import torch


def drop_caches() -> bool:
    """Drop the page cache (root only); False where the kernel does not allow it."""
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def load_model(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder in memory (for comparing outputs, not for merging)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out
