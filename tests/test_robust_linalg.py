"""Linear algebra that cannot take a merge down (math/robust.py): the polar factor of a
near-orthogonal matrix by Newton–Schulz equals the SVD's; a failing SVD is retried by the
fallbacks; when every attempt fails the merge ends in one line naming the tensor, exit 3,
with the finished shards kept."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from streammerge.cli import main
from streammerge.math import robust
from tests.conftest import experts_of


def near_orthogonal(n: int, spread: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Q (I + E) with ‖E‖ ≈ spread: singular values clustered at 1, where gesdd can fail."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    e = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (q @ (torch.eye(n, dtype=torch.float64) + spread * e / torch.linalg.matrix_norm(e, 2))).to(dtype)


@pytest.mark.parametrize(
    "n,spread,dtype",
    [(64, 1e-9, torch.float64), (300, 1e-3, torch.float64), (300, 0.2, torch.float64), (256, 1e-4, torch.float32)],
)
def test_newton_schulz_polar_equals_the_svd_polar(n, spread, dtype):
    m = near_orthogonal(n, spread, n, dtype)
    x = robust.newton_schulz_polar(m)
    assert x is not None
    u, _, vh = torch.linalg.svd(m.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert float(torch.linalg.matrix_norm(x.double() - u @ vh)) <= tol * n**0.5
    eye = torch.eye(n, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(x.double().T @ x.double() - eye)) <= tol * n**0.5


def test_far_from_orthogonal_goes_to_the_svd():
    m = torch.randn(50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert robust.newton_schulz_polar(m) is None
    u, _, vh = torch.linalg.svd(m)
    assert torch.allclose(robust.polar(m), u @ vh, atol=1e-12)


def test_failed_svd_is_retried(monkeypatch):
    real = torch.linalg.svd
    calls = []

    def flaky(m, *args, **kwargs):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError(
                "linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned"
            )
        return real(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    m = torch.randn(20, 30, generator=torch.Generator().manual_seed(2))
    u, s, vh = robust.svd(m, full_matrices=False)
    assert calls == [torch.float32, torch.float64] and u.dtype == torch.float32
    assert torch.allclose(u * s @ vh, m, atol=1e-5)


def test_merge_whose_svd_always_fails_ends_in_one_line_exit_3(toy_untied, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    out = tmp_path / "o"
    args = [
        "merge",
        "--quiet",
        "--device",
        "cpu",
        "--base",
        os.path.join(toy_untied, "base"),
        "--method",
        "orthomerge",
        "--target",
        "global",
        "--shard-size",
        "60KB",
        "--out",
        str(out),
    ]
    for e in experts_of(toy_untied):
        args += ["--expert", e]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    lines = [line for line in r.output.strip().splitlines() if line]
    assert len(lines) == 1 and "tensor '" in lines[0] and "did not converge" in lines[0] and "Traceback" not in r.output
    assert not (out / "model.safetensors.index.json").exists()
    finals = [f for f in os.listdir(out) if f.startswith("model-") and f.endswith(".safetensors")]
    # the shards before the first rotated tensor (the embedding comes first) may be kept; none is half-written
    for f in finals:
        assert os.path.getsize(out / f) > 0
