"""Property tests of the orthogonal-group mathematics (Hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.math.cayley import cayley, cayley_neumann, inverse_cayley, peft_rotation
from streammerge.math.lie_mean import magnitude_corrected_mean
from streammerge.math.procrustes import (
    SubspaceBuilder,
    full_rotation,
    generator_of,
    identity_rotation,
    procrustes,
    rotate_base,
)
from streammerge.math.skew import block_diag, pack_skew, unpack_skew
from streammerge.math.strategies import matrices, skew_matrices

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.shape[-1], dtype=x.dtype)


@given(skew_matrices(max_norm=20.0))
def test_cayley_of_any_skew_matrix_is_orthogonal_with_det_one(q):
    r = cayley(q)
    tol = TOL[q.dtype] * (1 + float(torch.linalg.matrix_norm(q)) ** 2)
    assert torch.allclose(r.T @ r, eye_like(r), atol=tol)
    assert abs(float(torch.linalg.det(r.double())) - 1.0) < 1e3 * tol


@given(skew_matrices(max_norm=3.0))
def test_inverse_cayley_after_cayley_is_identity(q):
    back = inverse_cayley(cayley(q))
    assert torch.allclose(back, q, atol=50 * TOL[q.dtype] * (1 + float(torch.linalg.matrix_norm(q)) ** 2))
    assert torch.equal(back, -back.T)  # exactly skew


@given(skew_matrices(max_norm=3.0))
def test_cayley_after_inverse_cayley_is_identity_away_from_minus_one(q):
    r = cayley(q)  # angles ≤ 2·atan(3) < π: R + I is invertible
    assert torch.allclose(
        cayley(inverse_cayley(r)), r, atol=50 * TOL[q.dtype] * (1 + float(torch.linalg.matrix_norm(q)) ** 2)
    )


def test_inverse_cayley_refuses_eigenvalue_minus_one():
    r = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))  # rotation by π
    with pytest.raises(ValueError):
        inverse_cayley(r)
    reflection = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        inverse_cayley(reflection)


def test_generator_of_a_half_turn_resets_that_plane_not_nan():
    c, s = math.cos(0.3), math.sin(0.3)
    r = torch.tensor([[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, c, -s], [0, 0, s, c]], dtype=torch.float64)
    rot = generator_of(r)
    assert rot.clipped_planes == 1
    assert torch.isfinite(rot.dense_q()).all()
    assert torch.allclose(rot.dense_r()[:2, :2], torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rot.dense_r()[2:, 2:], r[2:, 2:], atol=1e-12)


@given(skew_matrices(n=(2, 8), dtype=torch.float64, max_norm=0.5), st.sampled_from([2, 3, 4, 5, 8]))
def test_peft_neumann_series_approximates_cayley_plus(q, terms):
    approx = cayley_neumann(q, terms, "peft>=0.18")
    exact = cayley(q)
    assert float(torch.linalg.matrix_norm(approx - exact)) <= 4 * float(torch.linalg.matrix_norm(q)) ** 2 + 1e-12
    assert torch.allclose(peft_rotation(q, use_cayley_neumann=False), cayley(-q))


def test_neumann_coefficients_match_peft_versions():
    q = torch.tensor([[0.0, 0.1], [-0.1, 0.0]], dtype=torch.float64)
    i, q2, q3, q4 = torch.eye(2, dtype=torch.float64), q @ q, q @ q @ q, q @ q @ q @ q
    assert torch.allclose(cayley_neumann(q, 5, "peft>=0.18"), i + 2 * q + 2 * q2 + 2 * q3 + q4)
    assert torch.allclose(cayley_neumann(q, 5, "peft0.16"), i + 2 * q + 2 * q2 + 2 * q3 + 2 * q4)
    assert torch.allclose(cayley_neumann(q, 3, "peft>=0.18"), i + 2 * q + 2 * q2 + q3)  # PEFT's loop quirk
    assert torch.allclose(cayley_neumann(q, 2, "peft>=0.18"), i + 2 * q)


@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_packing_round_trips_in_peft_order(r, b, seed):
    packed = torch.randn(r, b * (b - 1) // 2, generator=torch.Generator().manual_seed(seed))
    q = unpack_skew(packed)
    assert torch.equal(q, -q.transpose(-1, -2))
    assert torch.equal(pack_skew(q), packed)
    rows, cols = torch.triu_indices(b, b, 1)
    assert torch.equal(q[:, rows[0], cols[0]], packed[:, 0])  # first packed entry is Q[0, 1]
    assert block_diag(q).shape == (r * b, r * b)


def solve(base: torch.Tensor, target: torch.Tensor, null_rtol: float = 1e-6):
    builder = SubspaceBuilder(base, base_rtol=1e-12)  # exactness: trust every base direction
    builder.add(target - base.double())
    sub = builder.build()
    return sub, procrustes(target, sub, null_rtol, max_angle=math.pi * 0.999)


shapes = st.sampled_from([(6, 6), (3, 8), (9, 4), (1, 5), (8, 8)])  # square, wide, tall


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.01, 2.0))
def test_procrustes_is_optimal_over_rotations(shape, seed, spread):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    sub, rot = solve(a, b, null_rtol=1e-12)
    r = full_rotation(sub, rot)
    n = shape[1]
    assert torch.allclose(r.T @ r, torch.eye(n, dtype=torch.float64), atol=1e-9)
    assert float(torch.linalg.det(r)) > 0
    best = float(torch.linalg.matrix_norm(b - a @ r.T))
    assert torch.allclose(rotate_base(a, sub, rot), a @ r.T, atol=1e-9)
    m = b.T @ a  # no rotation fits better than the nuclear-norm bound, and random ones don't either
    lower = math.sqrt(max(0.0, float((b * b).sum() + (a * a).sum() - 2 * torch.linalg.matrix_norm(m, ord="nuc"))))
    if torch.linalg.det(torch.linalg.svd(m).U @ torch.linalg.svd(m).Vh) > 0 or torch.linalg.matrix_rank(m) < n:
        assert best <= lower + 1e-7 * (1 + lower)
    for _ in range(20):
        upper = torch.randn(n, n, generator=g, dtype=torch.float64).triu(1)
        other = cayley(upper - upper.T)
        assert float(torch.linalg.matrix_norm(b - a @ other.T)) >= best - 1e-9


@given(shapes, st.integers(0, 2**31 - 1))
def test_procrustes_of_unchanged_target_is_identity(shape, seed):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sub, rot = solve(a, a)
    assert torch.allclose(rot.dense_r(), torch.eye(sub.k, dtype=torch.float64), atol=1e-8)
    assert float(torch.linalg.matrix_norm(rot.dense_q())) < 1e-7


@given(matrices((2, 9), (2, 9)), skew_matrices(max_norm=2.0, dtype=torch.float64))
def test_rotation_keeps_spectral_norm_and_row_angles(w, q):
    n = w.shape[1]
    q = q[:n, :n] if q.shape[0] >= n else torch.nn.functional.pad(q, (0, n - q.shape[0], 0, n - q.shape[0]))
    r = cayley(q).to(w.dtype)
    rotated = w @ r.T
    tol = 50 * TOL[w.dtype] * (1 + float(torch.linalg.matrix_norm(w)))
    assert abs(float(torch.linalg.matrix_norm(rotated, ord=2)) - float(torch.linalg.matrix_norm(w, ord=2))) < tol
    assert torch.allclose(
        rotated @ rotated.T, w @ w.T, atol=tol * (1 + float(torch.linalg.matrix_norm(w)))
    )  # Gram: norms and angles


@given(st.lists(skew_matrices(n=5, dtype=torch.float64), min_size=1, max_size=6), st.data())
def test_magnitude_corrected_norm_is_weighted_mean_of_norms(qs, data):
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=len(qs), max_size=len(qs)))
    q_star = magnitude_corrected_mean(qs, weights)
    total = sum(w * q for w, q in zip(weights, qs))
    expected = sum(w * float(torch.linalg.matrix_norm(q)) for w, q in zip(weights, qs)) / sum(weights)
    if float(torch.linalg.matrix_norm(total)) > 1e-9:
        assert abs(float(torch.linalg.matrix_norm(q_star)) - expected) < 1e-9 * (1 + expected)
    assert torch.isfinite(q_star).all()


def test_all_zero_or_cancelling_generators_give_zero_not_nan():
    z = torch.zeros(4, 4, dtype=torch.float64)
    assert torch.equal(magnitude_corrected_mean([z, z, z]), z)
    q = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(magnitude_corrected_mean([q, -q]), torch.zeros_like(q))


@given(st.integers(2, 6), st.floats(0.01, 2.0), st.integers(0, 2**31 - 1))
def test_orthogonal_equal_norm_generators_give_sum_over_sqrt_n(n, norm, seed):
    size = 2 * n + 2  # disjoint planes make the generators mutually orthogonal
    g = torch.Generator().manual_seed(seed)
    qs = []
    for i in range(n):
        q = torch.zeros(size, size, dtype=torch.float64)
        q[2 * i, 2 * i + 1] = norm / math.sqrt(2)
        q[2 * i + 1, 2 * i] = -norm / math.sqrt(2)
        qs.append(q)
    perm = torch.randperm(size, generator=g)
    qs = [q[perm][:, perm] for q in qs]  # same orthogonality in a shuffled basis
    assert torch.allclose(magnitude_corrected_mean(qs), sum(qs) / math.sqrt(n), atol=1e-12)
    assert torch.allclose(magnitude_corrected_mean([qs[0]] * n), qs[0], atol=1e-12)


@given(st.lists(skew_matrices(n=4, dtype=torch.float64), min_size=2, max_size=5), st.randoms())
def test_lie_mean_does_not_depend_on_expert_order(qs, rnd):
    shuffled = list(qs)
    rnd.shuffle(shuffled)
    assert torch.allclose(magnitude_corrected_mean(qs), magnitude_corrected_mean(shuffled), atol=1e-12)


def test_identity_rotation_has_zero_generator():
    sub = SubspaceBuilder(torch.randn(3, 5, dtype=torch.float64)).build()
    rot = identity_rotation(sub)
    assert torch.equal(rot.dense_q(), torch.zeros(sub.k, sub.k, dtype=torch.float64))
    assert torch.equal(rotate_base(sub.ap @ sub.p.T, sub, rot), sub.ap @ sub.p.T)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(3, 12), (2, 9), (5, 16), (1, 4)]), st.integers(0, 2**31 - 1), st.floats(0.01, 1.0))
def test_wide_low_rank_path_equals_the_dense_k_by_k_solution(shape, seed, spread):
    """Wide layers solve in a frame of width ≤ 2·out; the result must be the k×k one."""
    from streammerge.math.procrustes import _complete_nearest_identity

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    sub, rot = solve(a, b, null_rtol=1e-12)
    assert rot.frame is not None and rot.frame.shape[1] <= 2 * shape[0]  # the cheap path ran
    u, s, vh = torch.linalg.svd((b @ sub.p).T @ sub.ap)
    r = int((s > 1e-12 * s[0]).sum())
    dense = _complete_nearest_identity(u, vh.T, r)
    assert torch.allclose(rot.dense_r(), dense, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.01, 1.0))
def test_procrustes_in_float32_is_orthogonal_near_optimal_and_identity_when_unchanged(shape, seed, spread):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = a + spread * torch.randn(shape, generator=g)
    builder = SubspaceBuilder(a, base_rtol=1e-6, dtype=torch.float32)
    builder.add(b - a)
    sub = builder.build()
    rot = procrustes(b, sub, null_rtol=1e-6, max_angle=math.pi * 0.999)
    r = full_rotation(sub, rot).double()
    n = shape[1]
    assert torch.allclose(r.T @ r, torch.eye(n, dtype=torch.float64), atol=1e-4)
    m = b.double().T @ a.double()
    best = float(torch.linalg.matrix_norm(b.double() - a.double() @ r.T))
    reference = full_rotation(*solve(a.double(), b.double(), null_rtol=1e-12))
    assert best <= float(torch.linalg.matrix_norm(b.double() - a.double() @ reference.T)) + 1e-4 * (
        1 + float(torch.linalg.matrix_norm(m)) ** 0.5
    )
    same = SubspaceBuilder(a, base_rtol=1e-6, dtype=torch.float32).build()
    assert float(torch.linalg.matrix_norm(procrustes(a, same).dense_q())) < 1e-3
