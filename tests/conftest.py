"""Shared fixtures: toy models made by tools/make_toy_models.py (deterministic, no download)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = _load_tool("make_toy_models")

# Under pytest-xdist (tools/run_tests.sh runs two workers) each file's tests run on one worker, in
# their order, as they do without it: a module's fixtures are made once, one Ray test cluster runs at
# a time. test_fused.py and test_plan_budget.py share a worker: the plans measured there count
# numba's compile where its cache lacks a kernel, so the kernels test_fused.py compiles come first.
SAME_WORKER = {"test_fused.py": "numba-cache", "test_plan_budget.py": "numba-cache"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = os.path.basename(str(item.fspath))
        item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(name, name)))


def make_toy(folder: str, *args: str) -> str:
    if not os.path.exists(os.path.join(folder, "base", "model.safetensors.index.json")):
        assert toy.main([folder, *args]) == 0
    return folder


def load_all(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in memory (the reference side of the tests only)."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k)
    return out


@pytest.fixture(scope="session")
def toy_untied(tmp_path_factory) -> str:
    """3 full-delta experts, untied embeddings, q/k/v biases, several shards."""
    return make_toy(
        str(tmp_path_factory.mktemp("toy_untied")),
        "--preset",
        "tiny",
        "--experts",
        "3",
        "--bias",
        "--shard-size",
        "60KB",
    )


@pytest.fixture(scope="session")
def toy_tied(tmp_path_factory) -> str:
    """3 low-rank experts, tied embeddings (no lm_head), several shards."""
    return make_toy(
        str(tmp_path_factory.mktemp("toy_tied")),
        "--preset",
        "tiny",
        "--experts",
        "3",
        "--tied",
        "--kind",
        "lowrank",
        "--shard-size",
        "50KB",
    )


def experts_of(folder: str, n: int = 3) -> list[str]:
    return [os.path.join(folder, f"expert-{i}") for i in range(1, n + 1)]


def evict(*paths: str) -> bool:
    """Drop the files' clean pages from the page cache, as a merge usually finds its inputs (the
    read-ahead then reads them into its buffers; what is cached it reads in place); whether they
    are gone, as the read-ahead asks (prefetch.PageCache)."""
    from streammerge.prefetch import PageCache

    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cache = PageCache()
    try:
        return not any(cache.holds(p, 0, os.path.getsize(p)) for p in paths)
    finally:
        cache.close()


def merge_hashes(recipe) -> dict[str, str]:
    """Merge `recipe` on the CPU; the SHA-256 of each output shard (at least two)."""
    import hashlib

    from streammerge.engine import Merge, RunOptions

    m = Merge(recipe, RunOptions(device="cpu", quiet=True))
    m.run()
    m.close()
    names = sorted(n for n in os.listdir(recipe.out) if n.endswith(".safetensors"))
    assert len(names) > 1
    return {n: hashlib.sha256(open(os.path.join(recipe.out, n), "rb").read()).hexdigest() for n in names}


def conflicting_models(root: str, shape: tuple[int, int], name: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Base + three experts of one weight `name` [shape] (and a norm), stored as `dtype`."""
    from streammerge.io.atomic import ShardWriter

    base = torch.randn(shape, generator=torch.Generator().manual_seed(0)) / 45
    common = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    for i, model in enumerate(["base", "expert-1", "expert-2", "expert-3"]):
        folder = os.path.join(root, model)
        os.makedirs(folder)
        g = torch.Generator().manual_seed(i)
        # a shared update direction per row with a random sign per expert and row: each expert
        # is in the minority (conflicts with τ_mean) on about a quarter of the rows
        signs = torch.randint(0, 2, (shape[0], 1), generator=g) * 2.0 - 1.0
        w = base if i == 0 else base + 0.002 * (signs * common + 0.3 * torch.randn(shape, generator=g))
        code = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
        layout = [(name, code, shape), ("norm.weight", code, (shape[1],))]
        with ShardWriter(os.path.join(folder, "model-00001-of-00001.safetensors"), layout) as writer:
            writer.write(name, w.to(dtype))
            writer.write("norm.weight", torch.ones(shape[1]).to(dtype))
            writer.commit()
        json.dump(
            {"weight_map": {n: "model-00001-of-00001.safetensors" for n, _, _ in layout}},
            open(os.path.join(folder, "model.safetensors.index.json"), "w"),
        )
    return root
