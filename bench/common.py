"""Helpers the benchmark scripts share: dropping the page cache, loading a model folder whole,
writing a result as JSON and Markdown with its provenance, a checkout of another commit to run
beside this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def checkout(commit: str, path: str) -> str:
    """A `git worktree` of `commit` at `path` (made anew where it holds another commit): a baseline
    run beside this checkout (`python -m streammerge.cli` from there imports its own package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def rev(ref: str, where: str) -> str:
        return subprocess.run(["git", "rev-parse", ref], cwd=where, capture_output=True, text=True).stdout.strip()

    if os.path.exists(path) and rev("HEAD", path) != rev(commit, root):
        subprocess.run(["git", "worktree", "remove", "--force", path], cwd=root, check=True)
    if not os.path.exists(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, rev(commit, root)], cwd=root, check=True)
    return path


def load_model(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder in memory (for comparing outputs, not for merging)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def command(*args: str) -> list[str]:
    """The `streammerge` command's entry point (console.py) with `args`, run by this Python: from
    the package that the working folder holds, where a baseline checkout is run from its own."""
    return [sys.executable, "-c", "from streammerge.console import entry; entry()", *args]


def provenance(script: str, load_before: tuple[float, ...]) -> dict:
    """What a record starts with: the command that made it (`python bench/SCRIPT ARGS`), when, on
    how many cores, and the load averages before its runs and now, after them."""
    return {
        "command": f"python bench/{script} " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }


def provenance_line(doc: dict) -> str:
    """The first line of a record's table: its provenance, as `provenance` made it."""
    return (
        f"`{doc['command']}`, {doc['date']}, {doc['cores']} cores, load {doc['load_before'][0]:.1f} before, "
        f"{doc['load_after'][0]:.1f} after"
    )


def write_results(stem: str, doc: dict, lines: list[str]) -> None:
    """bench/results/STEM.json (the raw record) and STEM.md (its table), and the table on stdout."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
