"""Orthogonal Procrustes for weight matrices, well-defined where the textbook one is not.

Convention (torch layout; the rotation acts on the INPUT side, as in OFT and OrthoMerge):
a Linear weight W is [out, in]; a rotation R is [in, in]; rotating W gives `W @ R.T`
(the paper's R·W₀ with its W₀ = our Wᵀ). Procrustes finds R minimising ‖B − A Rᵀ‖_F for base
A and target B, i.e. maximising tr(Rᵀ M) with M = Bᵀ A (paper eq. 4: R = U Vᵀ, M = U Σ Vᵀ).

The rules that make R — and so its Cayley generator — well-defined (notes §2):
1. Subspace. R is the identity off S = span(strong base directions) ⊕ span(target-row
   directions the base does not use at all). "Strong": right singular vectors of A with
   σ_j > `base_rtol`·σ_max. In a weak direction the column of M = BᵀA is σ_j·(σ_j e_j + noise):
   once σ_j is below the size of the update, the polar factor there is decided by the update's
   noise and yields large random rotations (SmolLM2 o_proj: condition numbers to 5e4, one
   generator of norm 55 where the median was 0.09); there the update stays in the residual.
   Directions outside the base's row space (wide layers: in − out of them) are added from the
   targets, so the fit stays optimal there. With P an orthonormal basis of S (k = dim S; for a
   wide layer k ≤ 2·out) the problem is exactly the k×k one M_s = Pᵀ M P, R_s = polar(M_s),
   R = P R_s Pᵀ + (I − P Pᵀ). All experts of one weight share one P, so generators add in k×k.
2. Null completion. Singular values of M_s below `null_rtol`·σ_max count as zero. On those
   blocks U_n, V_n every completion is optimal; we take the one nearest the identity,
   Z = polar(U_nᵀ V_n), so an unchanged direction gets no rotation.
3. Reflections. If det R_s = −1 the best rotation flips one direction (Kabsch): a null-block
   direction when there is one (no loss), else the least-weighted singular pair.
4. Angles. The inverse Cayley is singular at angle π. Invariant planes rotated by more than
   `max_angle` are reset to the identity (the residual keeps what they carried).
An expert equal to the base gets exactly the identity (generator 0); callers short-circuit it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import lapack
from .cayley import inverse_cayley
from .robust import polar, svd

RANK_RTOL = 1e-10  # numerical rank when building the subspace basis (float64)


@dataclass(frozen=True)
class Subspace:
    """P [in, k] orthonormal, and A P [out, k] for the base A."""

    p: torch.Tensor
    ap: torch.Tensor

    @property
    def k(self) -> int:
        return self.p.shape[1]

    @property
    def full(self) -> bool:
        return self.p.shape[1] == self.p.shape[0]


def nonzero_rows(rows: torch.Tensor) -> torch.Tensor:
    """`rows` without its zero rows, which add no direction to a subspace: a conflict target
    changes about a quarter of the rows, and an SVD costs in proportion to the rows it is given."""
    nonzero = rows.any(dim=1)
    return rows if bool(nonzero.all()) else rows[nonzero]


class SubspaceBuilder:
    """Grows P: the base's strong directions, then target-row directions outside its row space."""

    def __init__(self, a: torch.Tensor, base_rtol: float = 1e-2, dtype: torch.dtype = torch.float64):
        self.a = a.to(dtype)
        _, s, vh = svd(self.a, full_matrices=False)
        top = float(s[0]) if s.numel() else 0.0
        self.scale = top
        self.strong = vh[s > base_rtol * top].T if top > 0 else vh[:0].T
        # `known`: everything the base uses at all, then what targets added; P never re-adds it
        self.known = vh[s > RANK_RTOL * top].T if top > 0 else vh[:0].T
        self.added = self.known[:, :0]

    @property
    def full(self) -> bool:
        return self.known.shape[1] >= self.known.shape[0]

    def add(self, rows: torch.Tensor) -> None:
        if self.full:
            return
        rows = nonzero_rows(rows).to(self.known.dtype)
        rest = rows - (rows @ self.known) @ self.known.T
        _, s, vh = svd(rest, full_matrices=False)
        scale = max(self.scale, float(torch.linalg.matrix_norm(rows, ord=2)))
        new = vh[s > RANK_RTOL * scale].T
        if new.shape[1]:
            new = new - self.known @ (self.known.T @ new)  # once more: Gram-Schmidt loses a little
            q, _ = lapack.qr(new)
            q = q[:, : self.known.shape[0] - self.known.shape[1]]
            self.known = torch.cat([self.known, q], dim=1)
            self.added = torch.cat([self.added, q], dim=1)

    def build(self) -> Subspace:
        p = torch.cat([self.strong, self.added], dim=1).contiguous()
        return Subspace(p, (self.a @ p).contiguous())


@dataclass(frozen=True)
class SubspaceRotation:
    """R_s = I + F (R_w − I) Fᵀ in the subspace's coordinates, F [k, w] an orthonormal frame
    (None: F = I, R_s = R_w). Q_w is its Cayley generator in the frame; `clipped_planes`
    counts rule-4 resets. A wide layer's rotation lives in a frame of width w ≤ 2·out."""

    r_w: torch.Tensor
    q_w: torch.Tensor
    frame: torch.Tensor | None = None
    clipped_planes: int = 0

    def _embed(self, m: torch.Tensor, identity: bool) -> torch.Tensor:
        if self.frame is None:
            return m
        k = self.frame.shape[0]
        eye_w = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        core = m - eye_w if identity else m
        out = self.frame @ core @ self.frame.T
        return out + torch.eye(k, dtype=m.dtype, device=m.device) if identity else out

    def dense_r(self) -> torch.Tensor:
        """R_s [k, k]."""
        return self._embed(self.r_w, identity=True)

    def dense_q(self) -> torch.Tensor:
        """Q_s [k, k] (zero outside the frame)."""
        return self._embed(self.q_w, identity=False)

    def to(self, device) -> "SubspaceRotation":
        return SubspaceRotation(
            self.r_w.to(device),
            self.q_w.to(device),
            None if self.frame is None else self.frame.to(device),
            self.clipped_planes,
        )


def _complete_nearest_identity(u: torch.Tensor, v: torch.Tensor, r: int) -> torch.Tensor:
    """Rotation [w, w] mapping v[:, :r] to u[:, :r] (columns orthonormal), completed on the
    orthogonal complements nearest the identity (rule 2) and with det +1 (rule 3).
    u, v [w, w] are complete orthonormal bases whose first r columns are the fixed pairs."""
    rot = u[:, :r] @ v[:, :r].T
    w = u.shape[0]
    if r < w:
        c = u[:, r:].T @ v[:, r:]  # near-orthogonal where the pairs leave little out: see robust.py
        null_part = u[:, r:] @ polar(c) @ v[:, r:].T
        if lapack.det(rot + null_part) < 0:
            x, _, yh = svd(c)
            x = x.clone()
            x[:, -1] = -x[:, -1]  # flip the completion direction that costs least (Kabsch)
            null_part = u[:, r:] @ (x @ yh) @ v[:, r:].T
        return rot + null_part
    if lapack.det(rot) < 0:
        rot = rot - 2.0 * torch.outer(u[:, r - 1], v[:, r - 1])
    return rot


def procrustes(
    target: torch.Tensor, sub: Subspace, null_rtol: float = 1e-6, max_angle: float = 0.5 * math.pi
) -> SubspaceRotation:
    """The rotation (rules 1–4) best taking base A to `target` B [out, in]; S must contain B's rows.

    M_s = Xᵀ Y with X = B P, Y = A P [out, k] has rank ≤ out. When 2·out ≤ k (wide layers) its
    SVD comes from two thin QRs and an out×out SVD, and the rotation lives in the frame
    F = span(U_r, V_r) of width ≤ 2·out: off F, both U_r and V_r vanish and the nearest-identity
    completion is the identity (so this equals the k×k computation at a fraction of its cost).
    """
    k = sub.k
    if k == 0:
        z = sub.p.new_zeros(0, 0)
        return SubspaceRotation(z, z)
    x = target.to(sub.p.dtype) @ sub.p
    y = sub.ap
    out = x.shape[0]
    if 2 * out > k:
        return procrustes_from_cross(x.T @ y, null_rtol, max_angle)
    qx, rx = lapack.qr(x.T)  # [k, out], [out, out]
    qy, ry = lapack.qr(y.T)
    uc, s, vch = svd(rx @ ry.T)
    r = int((s > null_rtol * s[0]).sum()) if s[0] > 0 else 0
    ur, vr = qx @ uc[:, :r], qy @ vch[:r].T  # [k, r]: M_s = U_r Σ V_rᵀ
    frame, _ = lapack.qr(torch.cat([ur, vr], dim=1))  # [k, 2r] ⊇ span(U_r, V_r)
    u_full, _ = lapack.qr(frame.T @ ur, mode="complete")
    v_full, _ = lapack.qr(frame.T @ vr, mode="complete")
    # QR fixes each column only up to sign: restore the pairing u_j ↔ v_j of the SVD
    u_full[:, :r] = frame.T @ ur
    v_full[:, :r] = frame.T @ vr
    rot = generator_of(_complete_nearest_identity(u_full, v_full, r), max_angle)
    return SubspaceRotation(rot.r_w, rot.q_w, frame, rot.clipped_planes)


def procrustes_from_cross(
    m_s: torch.Tensor, null_rtol: float = 1e-6, max_angle: float = 0.5 * math.pi
) -> SubspaceRotation:
    """The rotation (rules 2–4) maximising tr(R_sᵀ M_s) for the k×k cross product M_s = Xᵀ Y
    (which callers may have summed over row blocks)."""
    u, s, vh = svd(m_s)
    r = int((s > null_rtol * s[0]).sum()) if s[0] > 0 else 0
    return generator_of(_complete_nearest_identity(u, vh.T, r), max_angle)


def generator_of(rot: torch.Tensor, max_angle: float = 0.5 * math.pi) -> SubspaceRotation:
    """Inverse Cayley of rotation `rot`, after resetting planes rotated by more than `max_angle`."""
    bound = math.tan(max_angle / 2)
    try:
        q = inverse_cayley(rot)
        if float(torch.linalg.matrix_norm(q)) <= bound:  # ‖Q‖₂ ≤ ‖Q‖_F: every angle within bound
            return SubspaceRotation(rot, q)
    except ValueError:
        pass
    # The symmetric part's eigenvalues are cos θ of the invariant planes (R is normal, so its
    # eigenspaces are R-invariant); set R to the identity on planes with θ > max_angle.
    evals, evecs = lapack.eigh(0.5 * (rot + rot.T))
    wild = evals < math.cos(max_angle)
    w = evecs[:, wild]
    fixed = polar(rot - rot @ w @ w.T + w @ w.T)  # polar: clean the round-off of the split
    return SubspaceRotation(fixed, inverse_cayley(fixed), None, int(wild.sum()) // 2)


def identity_rotation(sub: Subspace) -> SubspaceRotation:
    z = sub.p.new_zeros(0, 0)
    return SubspaceRotation(z, z, sub.p.new_zeros(sub.k, 0))


def transpose_minus_identity(r: torch.Tensor) -> torch.Tensor:
    """Rᵀ − I, a new tensor (the part of a rotation that moves anything)."""
    out = r.T.clone()
    out.diagonal().sub_(1.0)
    return out


def rotate_base(a: torch.Tensor, sub: Subspace, rot: "SubspaceRotation | torch.Tensor") -> torch.Tensor:
    """A Rᵀ for R = P R_s Pᵀ + (I − P Pᵀ): A + (A P)(R_sᵀ − I) Pᵀ, in A's dtype. `rot` is a
    SubspaceRotation (its frame keeps this at O(out·in·w)) or a dense R_s [k, k]."""
    if sub.k == 0:
        return a.clone()
    if isinstance(rot, SubspaceRotation):
        if rot.frame is not None:
            eye = torch.eye(rot.r_w.shape[0], dtype=rot.r_w.dtype, device=rot.r_w.device)
            return a + (((sub.ap @ rot.frame) @ (rot.r_w.T - eye)) @ (sub.p @ rot.frame).T).to(a.dtype)
        rot = rot.r_w
    update = (sub.ap @ transpose_minus_identity(rot)) @ sub.p.T
    return a + update.to(a.dtype)


def full_rotation(sub: Subspace, rot: "SubspaceRotation | torch.Tensor") -> torch.Tensor:
    """The [in, in] matrix R (tests and small layers)."""
    r_s = rot.dense_r() if isinstance(rot, SubspaceRotation) else rot
    n = sub.p.shape[0]
    eye = torch.eye(sub.k, dtype=r_s.dtype, device=r_s.device)
    return torch.eye(n, dtype=r_s.dtype, device=r_s.device) + sub.p @ (r_s - eye) @ sub.p.T
