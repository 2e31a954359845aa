"""On a CUDA machine (skipped elsewhere; bench/gpu_check.sh runs these): the GPU path merges
the toy models like the CPU path, within float32 round-off of the update, and resumes there."""

from __future__ import annotations

import os

import pytest
import torch

from streammerge import Expert, Recipe, merge
from tests.conftest import experts_of, load_all

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("dare_ties", {}),
        ("orthomerge", {"target": "global"}),
        ("orthomerge", {"target": "conflict"}),
    ],
)
def test_cuda_merge_matches_cpu(method, params, toy_untied, tmp_path):
    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    outs = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / device)
        merge(
            Recipe(method, os.path.join(toy_untied, "base"), experts, out, dict(params), dtype="float32", seed=0),
            device=device,
        )
        outs[device] = load_all(out)
    base = load_all(os.path.join(toy_untied, "base"))
    for name, w in outs["cpu"].items():
        update = float((w - base[name].float()).norm()) or 1.0
        assert float((outs["cuda"][name] - w).norm()) <= 1e-3 * update, name


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_cuda_lean_wide_orthomerge_matches_cpu(target, toy_untied, tmp_path, monkeypatch):
    """#29: OrthoMerge's lean wide path (in-place QR and LU on CUDA) merges like the CPU."""
    from streammerge.methods import orthomerge

    monkeypatch.setattr(orthomerge, "LEAN_WIDE_K", 0)  # the toy's wide weights take it (same process)
    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    outs = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / device)
        recipe = Recipe("orthomerge", os.path.join(toy_untied, "base"), experts, out, {"target": target},
                        dtype="float32", seed=0)  # fmt: skip
        merge(recipe, device=device)
        outs[device] = load_all(out)
    base = load_all(os.path.join(toy_untied, "base"))
    for name, w in outs["cpu"].items():
        update = float((w - base[name].float()).norm()) or 1.0
        assert float((outs["cuda"][name] - w).norm()) <= 1e-3 * update, name
