"""procrustes.py's wide-layer mathematics in the memory a 70B `down_proj` allows (#29).

A Llama-3-70B down_proj is [8192, 28672]: its rotation subspace S has k up to 28,672 dimensions,
so each k×k (or in×k) float32 matrix is 3.3 GB and each frame [k, 2·out] 1.9 GB. The functions
here compute what SubspaceBuilder, procrustes, rotate_base and cayley compute, with the same
conventions (procrustes.py: R acts on the input side, W Rᵀ; cayley.py: R = (I + Q)(I − Q)⁻¹),
rearranged so that no such matrix is copied:
* `SubspaceBuffer`: P grows in one buffer [in, capacity] (P is a view of its first k columns),
  instead of concatenating a new basis at every expert;
* `frame_rotation`: the frame comes from an in-place QR of [U_r, V_r] (column-major), and
  Fᵀ U_r, Fᵀ V_r from its R factor, instead of a QR's copies and two more products; the
  completion and the inverse Cayley map add, subtract and factor in place (no identity matrix,
  no sum or LU copy of a [2·out, 2·out] matrix);
* `moved_base`: W₀Rᵀ − W₀ in column chunks (never the [in, w] product P F);
* `cayley_moved_base`: W₀R*ᵀ − W₀ for R* = cayley(Q*) from one in-place LU of I − Q*:
  R*ᵀ − I = 2(I − Q*)⁻ᵀ − 2I, so A P (R*ᵀ − I) = 2(Zᵀ − A P) with Z = (I − Q*)⁻¹ (A P)ᵀ, instead
  of forming R* (an inverse and two more k×k matrices).
The arithmetic differs from the whole path's in order only: results agree to float32 round-off
(tests/test_orthomerge.py), and like every factorisation here they run on one CPU thread
(lapack.py), so they do not depend on the thread count.
"""

from __future__ import annotations

import math

import torch

from . import lapack
from .procrustes import RANK_RTOL, Subspace, SubspaceRotation, generator_of, nonzero_rows
from .robust import polar, svd

CHUNK_ELEMENTS = 1 << 22  # elements of one column chunk's temporaries


def _chunks(total: int, other: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, other))
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


class SubspaceBuffer:
    """SubspaceBuilder's S (the base's strong directions, then target-row directions outside
    everything the base uses) in one preallocated buffer; `capacity` bounds k."""

    def __init__(self, a: torch.Tensor, base_rtol: float, dtype: torch.dtype, capacity: int):
        self.a = a.to(dtype)
        _, s, vh = svd(self.a, full_matrices=False)
        top = float(s[0]) if s.numel() else 0.0
        self.scale = top
        strong = int((s > base_rtol * top).sum()) if top > 0 else 0
        known = int((s > RANK_RTOL * top).sum()) if top > 0 else 0
        inn = a.shape[1]
        self.buf = torch.empty(inn, max(capacity, strong), dtype=dtype, device=a.device)
        self.buf[:, :strong] = vh[:strong].T
        self.weak = vh[strong:known].T.contiguous()  # used by the base, too weak to rotate: never in P
        self.k = strong
        del vh

    @property
    def full(self) -> bool:
        return self.k + self.weak.shape[1] >= self.buf.shape[0] or self.k >= self.buf.shape[1]

    def _off_known(self, x: torch.Tensor) -> torch.Tensor:
        """x [·, in] (rows) minus its part in everything known, in place."""
        p = self.buf[:, : self.k]
        x.sub_((x @ p) @ p.T)
        if self.weak.shape[1]:
            x.sub_((x @ self.weak) @ self.weak.T)
        return x

    def add(self, rows: torch.Tensor) -> None:
        if self.full:
            return
        rows = nonzero_rows(rows).to(self.buf.dtype)
        scale = max(self.scale, float(torch.linalg.matrix_norm(rows, ord=2)))
        rest = self._off_known(rows.clone())
        _, s, vh = svd(rest, full_matrices=False)
        del rest
        new = vh[s > RANK_RTOL * scale]  # [new, in]: rows
        del vh
        if new.shape[0]:
            new = self._off_known(new.clone())  # once more: Gram-Schmidt loses a little
            q, _ = lapack.qr(new.T)
            del new
            room = min(self.buf.shape[0] - self.k - self.weak.shape[1], self.buf.shape[1] - self.k)
            q = q[:, :room]
            self.buf[:, self.k : self.k + q.shape[1]] = q
            self.k += q.shape[1]

    def build(self) -> Subspace:
        p = self.buf[:, : self.k]
        return Subspace(p, self.a @ p)


def frame_rotation(
    x: torch.Tensor,
    qy: torch.Tensor,
    ry: torch.Tensor,
    null_rtol: float = 1e-6,
    max_angle: float = 0.5 * math.pi,
) -> SubspaceRotation:
    """procrustes()'s frame branch (2·out ≤ k) for X = B P [out, k], given the QR (qy, ry) of
    (A P)ᵀ, which every expert of the weight shares: M_s = Xᵀ Y = Q_x R_x R_yᵀ Q_yᵀ."""
    qx, rx = lapack.qr(x.T)
    uc, s, vch = svd(rx @ ry.T)
    r = int((s > null_rtol * s[0]).sum()) if s[0] > 0 else 0
    k = qx.shape[0]
    both = torch.empty(2 * r, k, dtype=qx.dtype, device=qx.device).T  # [k, 2r], column-major
    both[:, :r] = qx @ uc[:, :r]  # U_r
    del qx
    both[:, r:] = qy @ vch[:r].T  # V_r
    tau = torch.empty(2 * r, dtype=both.dtype, device=both.device)
    lapack.geqrf(both, out=(both, tau))
    rr = both[: 2 * r].triu()  # [U_r, V_r] = F R: Fᵀ U_r = R[:, :r], Fᵀ V_r = R[:, r:]
    lapack.householder_product(both, tau, out=both)
    frame = both
    fu, fv = rr[:, :r], rr[:, r:]
    u_full, _ = lapack.qr(fu, mode="complete")
    v_full, _ = lapack.qr(fv, mode="complete")
    u_full[:, :r] = fu  # QR fixes each column only up to sign: restore the pairing u_j ↔ v_j
    v_full[:, :r] = fv
    del rr, fu, fv
    rot = _complete_nearest_identity(u_full, v_full, r)
    del u_full, v_full
    bound = math.tan(max_angle / 2)
    try:
        q = _inverse_cayley(rot)
        if float(torch.linalg.matrix_norm(q)) <= bound:  # every angle within bound, as generator_of
            return SubspaceRotation(rot, q, frame)
        del q
    except ValueError:
        pass
    reset = generator_of(rot, max_angle)  # planes beyond max_angle: the whole path's reset (rare)
    return SubspaceRotation(reset.r_w, reset.q_w, frame, reset.clipped_planes)


def _complete_nearest_identity(u: torch.Tensor, v: torch.Tensor, r: int) -> torch.Tensor:
    """procrustes._complete_nearest_identity with the completion added in place."""
    rot = u[:, :r] @ v[:, :r].T
    w = u.shape[0]
    if r < w:
        c = u[:, r:].T @ v[:, r:]
        z = polar(c)
        rot.add_((u[:, r:] @ z) @ v[:, r:].T)
        if lapack.det(rot) < 0:  # flip the completion direction that costs least (Kabsch)
            rot.sub_((u[:, r:] @ z) @ v[:, r:].T)
            x, _, yh = svd(c)
            x = x.clone()
            x[:, -1] = -x[:, -1]
            rot.add_((u[:, r:] @ (x @ yh)) @ v[:, r:].T)
        return rot
    if lapack.det(rot) < 0:
        rot.addr_(u[:, r - 1], v[:, r - 1], alpha=-2.0)
    return rot


def _inverse_cayley(rot: torch.Tensor) -> torch.Tensor:
    """cayley.inverse_cayley: Q = (R + I)⁻¹(R − I), skew-symmetrised, with R + I factored where
    it lies (LAPACK factors the column-major view of its transpose; the adjoint solve undoes that)."""
    plus = rot.clone()
    plus.diagonal().add_(1.0)
    lu = plus.T
    piv = torch.empty(lu.shape[0], dtype=torch.int32, device=lu.device)
    info = torch.empty((), dtype=torch.int32, device=lu.device)
    lapack.lu_factor_ex(lu, out=(lu, piv, info))
    if int(info) != 0:
        raise ValueError("inverse Cayley: R has an eigenvalue at -1")
    minus = rot.clone()
    minus.diagonal().sub_(1.0)
    q = lapack.lu_solve(lu, piv, minus, adjoint=True)
    del plus, lu, minus
    if not bool(torch.isfinite(q).all()):
        raise ValueError("inverse Cayley: R has an eigenvalue at -1")
    return q.sub_(q.T.clone(memory_format=torch.contiguous_format)).mul_(0.5)


def moved_base(a: torch.Tensor, sub: Subspace, rot: SubspaceRotation) -> torch.Tensor:
    """W₀Rᵀ − W₀ = (A P F)(R_wᵀ − I)(P F)ᵀ [out, in] in A's dtype, P F formed a column chunk
    of W₀ at a time."""
    out = torch.zeros_like(a)
    if rot.frame is None or rot.frame.shape[1] == 0:
        if rot.frame is None and rot.r_w.numel():  # a dense k×k rotation (2·out > k)
            left = sub.ap @ (rot.r_w.T - torch.eye(rot.r_w.shape[0], dtype=rot.r_w.dtype, device=rot.r_w.device))
            for c in _chunks(a.shape[1], sub.k):
                out[:, c] = (left @ sub.p[c].T).to(a.dtype)
        return out
    eye = torch.eye(rot.r_w.shape[0], dtype=rot.r_w.dtype, device=rot.r_w.device)
    left = (sub.ap @ rot.frame) @ (rot.r_w.T - eye)
    for c in _chunks(a.shape[1], sub.k):
        out[:, c] = (left @ (sub.p[c] @ rot.frame).T).to(a.dtype)
    return out


def cayley_moved_base(q: torch.Tensor, sub: Subspace, into: torch.Tensor, share: list[float] | None = None) -> None:
    """Add W₀R*ᵀ − W₀ to `into` [out, in] for R* = cayley(Q*) on S, consuming Q* [k, k] (its
    storage becomes the LU factors of I − Q*). `share`: Σ of its squares added to share[0]."""
    m = q.neg_()
    m.diagonal().add_(1.0)  # I − Q*: singular values ≥ 1 for skew Q*, so no pivot is small
    lu = m.T  # column-major: LAPACK factors it where it lies
    piv = torch.empty(lu.shape[0], dtype=torch.int32, device=lu.device)
    info = torch.empty((), dtype=torch.int32, device=lu.device)
    lapack.lu_factor_ex(lu, out=(lu, piv, info))
    if int(info) != 0:
        raise torch.linalg.LinAlgError("I - Q* is singular")
    # lu holds the factors of (I − Q*)ᵀ: the adjoint solve is one with I − Q*
    z_t = lapack.lu_solve(lu, piv, sub.ap.T.contiguous(), adjoint=True)  # (I − Q*)⁻¹ (A P)ᵀ
    update = z_t.T.sub_(sub.ap).mul_(2.0)  # A P (R*ᵀ − I) [out, k]
    del z_t
    for c in _chunks(into.shape[1], sub.k):
        moved = (update @ sub.p[c].T).to(into.dtype)
        if share is not None:
            share[0] += float(moved.square().sum())
        into[:, c] += moved
