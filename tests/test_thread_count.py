"""A merge's bytes do not depend on the CPU thread count (so neither on the load when it started,
which sets the default, nor on a Ray task's --threads): factorisations run on one thread
(streammerge/math/lapack.py) and whole-tensor sums in a fixed order (methods.ordered_sum)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from streammerge.math import lapack
from tests.conftest import experts_of, make_toy


def _results(threads: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(900, 700, generator=g)
    gram = a.T @ a
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [
            lapack.eigh(gram)[1],
            lapack.svd(a, full_matrices=False)[0],
            lapack.qr(a)[0],
            lapack.solve(gram, a[:10].T),
            lapack.eigh(gram.double())[1],
            lapack.svd(a.double(), full_matrices=False)[2],
        ]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores to differ")
def test_factorisations_do_not_depend_on_the_thread_count():
    one, two = _results(1), _results(2)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_ordered_sum_does_not_depend_on_the_thread_count():
    from streammerge.methods import ordered_sum

    x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ordered_sum(x)
        torch.set_num_threads(2)
        two = ordered_sum(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    assert abs(float(one) - float(x.double().sum())) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores to differ")
@pytest.mark.parametrize(
    "method,extra",
    [
        # float32 linear algebra: where a last-bit difference in a factorisation shows (at 1.5B shapes
        # it flipped 0.5 % of a bf16 down_proj's entries)
        ("orthomerge", ("--target", "global", "--param", "precision=float32")),
        ("karcher", ()),  # its dot products and model_stock's cosines sum whole tensors
        ("model_stock", ()),
    ],
)
def test_merge_bytes_do_not_depend_on_threads(tmp_path_factory, tmp_path, method, extra):
    models = make_toy(
        str(tmp_path_factory.getbasetemp() / "threads-models"),
        "--preset",
        "small",
        "--layers",
        "1",
        "--experts",
        "3",
        "--shared",
        "0.7",
    )
    outs = []
    for threads in (1, 2):
        out = str(tmp_path / f"t{threads}")
        cmd = [
            sys.executable,
            "-m",
            "streammerge.cli",
            "merge",
            "--quiet",
            "--device",
            "cpu",
            "--threads",
            str(threads),
            "--base",
            os.path.join(models, "base"),
            *[a for e in experts_of(models) for a in ("--expert", e)],
            "--method",
            method,
            *extra,
            "--dtype",
            "float32",
            "--out",
            out,
        ]
        subprocess.run(cmd, check=True)
        outs.append(open(os.path.join(out, "model-00001-of-00001.safetensors"), "rb").read())
    assert outs[0] == outs[1]
