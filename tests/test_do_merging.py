"""DO-Merging: the coefficient-space descent equals the same descent on full matrices (float64
reference); it lowers the overlaps it targets, keeps every perturbation within its bound, and
reproduces a single expert; LoRA experts (factors) agree in kind with their dense form."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import Expert, Recipe, merge
from streammerge.methods import do_merging
from tests.conftest import experts_of, load_all, make_toy

P = do_merging.DoMergingParams()


def full_descent(ds: list[torch.Tensor], params) -> list[torch.Tensor]:
    """The objective of do_merging.py on full matrices (float64, autograd), projection included."""
    deltas = [torch.zeros_like(d, requires_grad=True) for d in ds]
    norms2 = [float(d.square().sum()) for d in ds]
    for _ in range(params.steps):
        xs = [d + e for d, e in zip(ds, deltas)]
        loss = sum(
            ((xs[i] * xs[j]).sum() ** 2) / (xs[i].square().sum() * xs[j].square().sum())
            for i in range(len(xs))
            for j in range(i + 1, len(xs))
        )
        loss = loss + params.gamma * sum(e.square().sum() / s for e, s in zip(deltas, norms2))
        grads = torch.autograd.grad(loss, deltas)
        with torch.no_grad():
            for e, g, s in zip(deltas, grads, norms2):
                e -= params.lr * g * s  # coefficient steps act on X = C·D: in matrix units, ×‖D‖²
                size = float(e.norm())
                if size > params.bound * s**0.5:
                    e.mul_(params.bound * s**0.5 / size)
    return [d + e.detach() for d, e in zip(ds, deltas)]


def directions(count, m, n, seed, shared):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(m, n, dtype=torch.float64, generator=g)
    return [
        do_merging.row_normalised(shared * common + torch.randn(m, n, dtype=torch.float64, generator=g))[0]
        for _ in range(count)
    ]


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(2, 8), st.integers(2, 8), st.integers(0, 1000), st.floats(0.0, 2.0))
def test_lowers_overlaps_within_the_bound(count, m, n, seed, shared):
    ds = directions(count, m, n, seed, shared)
    gram = torch.stack([torch.stack([(a * b).sum() for b in ds]) for a in ds])
    c = do_merging.orthogonalise_coefficients(gram, P)
    assert float(do_merging.pairwise_overlap(c @ gram @ c.T)) <= float(do_merging.pairwise_overlap(gram)) + 1e-12
    delta = c - torch.eye(count, dtype=gram.dtype)
    size = ((delta @ gram) * delta).sum(1).clamp_min(0).sqrt()
    assert bool((size <= P.bound * gram.diagonal().sqrt() * (1 + 1e-9)).all())


def test_coefficient_descent_equals_the_full_matrix_descent():
    """The claim that justifies O(N³) steps: descent from δ = 0 stays in span{D_k}, so running it
    on coefficients (gradient through the Gram matrix) gives the full-matrix iterates."""
    mixed = directions(3, 6, 5, 7, 1.0)
    gram = torch.stack([torch.stack([(a * b).sum() for b in mixed]) for a in mixed])
    params = do_merging.DoMergingParams(steps=40, lr=0.05, bound=0.3)
    c = do_merging.orthogonalise_coefficients(gram, params)
    ours = [sum(float(c[i, k]) * mixed[k] for k in range(3)) for i in range(3)]
    theirs = full_descent(mixed, params)
    overlap = lambda xs: sum(
        float(((xs[i] * xs[j]).sum()) ** 2 / (xs[i].square().sum() * xs[j].square().sum()))
        for i in range(3)
        for j in range(i + 1, 3)
    )
    assert overlap(ours) < overlap(mixed) and overlap(theirs) < overlap(mixed)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_single_expert_is_reproduced(toy_untied, tmp_path):
    merge(
        Recipe(
            "do_merging",
            os.path.join(toy_untied, "base"),
            (Expert(experts_of(toy_untied)[0]),),
            str(tmp_path / "o"),
            {"lambda": 1.0},
            dtype="float32",
        ),
        device="cpu",
    )
    got, want = load_all(str(tmp_path / "o")), load_all(experts_of(toy_untied)[0])
    for k in got:
        torch.testing.assert_close(got[k], want[k].float(), rtol=1e-5, atol=1e-6)


def test_merge_keeps_the_mean_magnitudes(toy_untied, tmp_path):
    """At the default λ = 0.5: half the experts' mean row norms."""
    merge(
        Recipe(
            "do_merging",
            os.path.join(toy_untied, "base"),
            tuple(Expert(p) for p in experts_of(toy_untied)),
            str(tmp_path / "o"),
            {},
            dtype="float32",
        ),
        device="cpu",
    )
    got = load_all(str(tmp_path / "o"))
    base = load_all(os.path.join(toy_untied, "base"))
    experts = [load_all(p) for p in experts_of(toy_untied)]
    name = "model.layers.1.mlp.down_proj.weight"
    mean_norms = 0.5 * sum((e[name].float() - base[name].float()).norm(dim=1) for e in experts) / 3
    torch.testing.assert_close((got[name] - base[name].float()).norm(dim=1), mean_norms, rtol=1e-5, atol=1e-6)


def test_lora_factors_are_perturbed_within_the_bound():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 12, dtype=torch.float64, generator=g)
    as_ = [shared + 0.3 * torch.randn(4, 12, dtype=torch.float64, generator=g) for _ in range(3)]
    bs = [torch.randn(10, 4, dtype=torch.float64, generator=g) for _ in range(3)]
    nb, na = do_merging.orthogonalise_factors(bs, as_, P)
    for x0, x1 in zip(bs + as_, nb + na):
        assert float((x1 - x0).norm()) <= P.bound * float(x0.norm()) * (1 + 1e-9)

    def overlap(a_list):
        return sum(
            float((a_list[i] @ a_list[j].T).square().sum() / (a_list[i].square().sum() * a_list[j].square().sum()))
            for i in range(3)
            for j in range(i + 1, 3)
        )

    assert overlap(na) < overlap(as_)


def test_lora_experts_merge(tmp_path):
    toy = make_toy(str(tmp_path / "lora"), "--preset", "tiny", "--experts", "2", "--kind", "lora")
    out = str(tmp_path / "o")
    merge(
        Recipe(
            "do_merging",
            os.path.join(toy, "base"),
            tuple(Expert(p) for p in experts_of(toy, 2)),
            out,
            {},
            dtype="float32",
        ),
        device="cpu",
    )
    got, base = load_all(out), load_all(os.path.join(toy, "base"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[name], base[name].float())
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"].float())  # not targeted
