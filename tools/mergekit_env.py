#!/usr/bin/env python3
"""mergekit 0.1.5 in a virtual environment of its own (bench/.venv-mergekit, sharing this
interpreter's torch and transformers), for the cross-check tests and bench/vs_mergekit.py.

    python tools/mergekit_env.py      # create it if missing; prints its python, exit 1 if impossible

Kept apart from the project's environment: mergekit pins and pulls packages (datasets,
pyarrow, pydantic) that streammerge does not need.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VENV = os.path.join(ROOT, "bench", ".venv-mergekit")
PYTHON = os.path.join(VENV, "bin", "python")
MERGEKIT = "mergekit==0.1.5"


def has_mergekit(python: str) -> bool:
    return (
        os.path.exists(python)
        and subprocess.run([python, "-c", "import mergekit"], capture_output=True).returncode == 0
    )


def ensure_mergekit() -> str | None:
    """The venv's python with mergekit importable, creating it if needed; None if it cannot be."""
    if has_mergekit(PYTHON):
        return PYTHON
    r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", VENV], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run(
            [os.path.join(VENV, "bin", "pip"), "install", "-q", MERGEKIT], capture_output=True, text=True
        )
    if r.returncode != 0 or not has_mergekit(PYTHON):
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["mergekit not importable"]
        print(f"{MERGEKIT} could not be installed in {VENV}: {last[0]}", file=sys.stderr)
        return None
    return PYTHON


if __name__ == "__main__":
    python = ensure_mergekit()
    if python:
        print(python)
    sys.exit(0 if python else 1)
