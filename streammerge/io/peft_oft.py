"""PEFT OFT adapters as experts: per targeted module a block-diagonal rotation of the base.

Formats (notes §3), told apart by their keys; block geometry always from tensor shapes:
  ≥ 0.16  `oft_R.weight` / `oft_embedding_R.weight` [r, b(b−1)/2], Q = U − Uᵀ (math/skew.py);
          map: exact cayley(−Q), or PEFT's Neumann series ≈ cayley(+Q) (`use_cayley_neumann`,
          coefficients by `peft_version`: < 0.18 all 2, else the last power 1); input side,
          W' = W R_bdᵀ; embeddings E' = E R_bd.  `block_share`: one block [1, ·] for all.
  0.14–15 `oft_r` [r, b, b] (Q = ½(A − Aᵀ), exact map) and `oft_s` [out, 1]: W' = (W R_bdᵀ) ⊙ s.
  ≤ 0.13  `oft_r` [r, b, b] over the OUTPUT side, exact map: W' = R_bdᵀ W (R_bd cut to `out`).
`generator(name)` gives the stored generator blocks (PEFT's own sign); OrthoMerge merges those
directly, as the authors do, and maps back with the adapters' shared convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, collect
from ..math.cayley import peft_rotation
from ..math.skew import block_size_from_packed, skew_part, unpack_skew
from .checkpoint import Checkpoint
from .peft_adapter import AdapterExpert

SUFFIXES = ("oft_R.weight", "oft_embedding_R.weight", "oft_r", "oft_s")


@dataclass(frozen=True)
class Convention:
    """Everything that decides how a generator becomes a weight; experts merged on the
    generator path must share it."""

    fmt: str  # "packed" (≥0.16), "full_scaled" (0.14–0.15), "output_side" (≤0.13)
    neumann: bool
    terms: int
    coefficients: str  # "peft>=0.18" or "peft0.16"

    def rotation(self, q_blocks: torch.Tensor) -> torch.Tensor:
        return peft_rotation(q_blocks, self.neumann, self.terms, self.coefficients)


@dataclass(frozen=True)
class OftModule:
    key: str
    scale_key: str | None
    blocks: int  # r
    block_size: int  # b
    shared: bool  # block_share: one stored block used r times
    embedding: bool


def _version_tuple(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return ()


class OftExpert(AdapterExpert):
    kind = "oft"

    def __init__(self, folder: str, base: Checkpoint, peft_version: str | None = None):
        super().__init__(folder, base)
        cfg = self.files.config
        where = self.files.path
        if str(cfg.get("peft_type", "")).upper() != "OFT":
            raise InputError(f"{where}: adapter_config.json says peft_type {cfg.get('peft_type')!r}, not OFT")
        self.modules: dict[str, OftModule] = {}  # base weight name -> module
        keys = self.files.modules(SUFFIXES)
        formats = set()
        for module, found in keys.items():
            weight = module + ".weight"
            if weight not in base.locations or len(base.info(weight).shape) != 2:
                self.problems.append(f"{where}: targets {module!r}, which the base has no 2-D {weight!r} for")
                continue
            out_f, in_f = base.info(weight).shape
            if "oft_R.weight" in found or "oft_embedding_R.weight" in found:
                key = found.get("oft_R.weight") or found["oft_embedding_R.weight"]
                emb = "oft_embedding_R.weight" in found
                shape = self.files.tensors.info(key).shape
                try:
                    b = block_size_from_packed(shape[1]) if len(shape) == 2 else 0
                except ValueError:
                    b = 0
                if not b:
                    self.problems.append(f"{where}: tensor {key!r} of shape {list(shape)} is not [blocks, b(b-1)/2]")
                    continue
                width = in_f
                shared = shape[0] == 1 and width // b > 1
                r = width // b if shared else shape[0]
                formats.add("packed")
                mod = OftModule(key, None, r, b, shared, emb)
            elif "oft_r" in found:
                key = found["oft_r"]
                shape = self.files.tensors.info(key).shape
                if len(shape) != 3 or shape[1] != shape[2]:
                    self.problems.append(f"{where}: tensor {key!r} of shape {list(shape)} is not [blocks, b, b]")
                    continue
                old = "oft_s" not in found
                width = out_f if old else in_f
                b = shape[1]
                shared = shape[0] == 1 and -(-width // b) > 1
                r = -(-width // b) if shared else shape[0]
                formats.add("output_side" if old else "full_scaled")
                mod = OftModule(key, found.get("oft_s"), r, b, shared, False)
            else:
                self.problems.append(f"{where}: module {module!r} has oft_s but no rotation")
                continue
            side = "output" if (mod.key.endswith("oft_r") and mod.scale_key is None) else "input"
            width = out_f if side == "output" else in_f
            covered = mod.blocks * mod.block_size
            if covered != width and not (side == "output" and covered >= width):
                self.problems.append(
                    f"{where}: module {module!r}: {mod.blocks} blocks of size {mod.block_size} do not cover its "
                    f"{side} width {width} "
                    "(the OFT block size must divide it)"
                )
                continue
            self.modules[weight] = mod
        for key in self.files.unknown_keys(SUFFIXES):
            self.problems.append(f"{where}: tensor {key!r} is not an OFT parameter")
        if len(formats) > 1:
            self.problems.append(f"{where}: mixes OFT formats {sorted(formats)}")
        fmt = formats.pop() if len(formats) == 1 else "packed"
        version = _version_tuple(peft_version or cfg.get("peft_version"))
        coefficients = "peft0.16" if version and version < (0, 18) else "peft>=0.18"
        neumann = bool(cfg.get("use_cayley_neumann", False)) and fmt == "packed"
        self.convention = Convention(fmt, neumann, int(cfg.get("num_cayley_neumann_terms", 5)), coefficients)
        if not self.modules and not self.problems:
            self.problems.append(f"{where}: no OFT modules found")

    def generator(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor | None:
        """Stored generator blocks [r, b, b] for `name` (PEFT's sign), or None if not targeted."""
        m = self.modules.get(name)
        if m is None:
            return None
        raw = self.files.tensors.get(m.key, dtype, device)
        q = unpack_skew(raw) if self.convention.fmt == "packed" else skew_part(raw)
        return q.expand(m.blocks, -1, -1).contiguous() if m.shared else q

    def row_scale(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor | None:
        m = self.modules.get(name)
        return None if m is None or m.scale_key is None else self.files.tensors.get(m.scale_key, dtype, device)

    def get(
        self, name: str, dtype: torch.dtype = torch.float32, device="cpu", rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        q = self.generator(name, dtype, device)
        if q is None:
            return self.base.get(name, dtype, device, rows)
        if self.convention.fmt == "output_side":  # R_bdᵀ W mixes rows: rotate whole, then cut
            w = apply_rotation(
                self.base.get(name, dtype, device),
                self.convention.rotation(q),
                self.modules[name],
                self.convention,
                self.row_scale(name, dtype, device),
            )
            return w if rows is None else w[rows[0] : rows[1]].clone()
        scale = self.row_scale(name, dtype, device)
        if rows is not None and scale is not None:
            scale = scale.reshape(-1)[rows[0] : rows[1]]
        w = self.base.get(name, dtype, device, rows)
        return apply_rotation(w, self.convention.rotation(q), self.modules[name], self.convention, scale)


def apply_rotation(
    w: torch.Tensor, r_blocks: torch.Tensor, module: OftModule, convention: Convention, row_scale: torch.Tensor | None
) -> torch.Tensor:
    """W' for rotation blocks R [r, b, b] under the module's side and PEFT's layout.

    Input side: W R_bdᵀ, done per block on W viewed as [out, r, b]; embeddings: E R_bd.
    Output side (≤ 0.13): R_bdᵀ W with R_bd cut to W's row count.
    """
    if convention.fmt == "output_side":
        out = w.shape[0]
        rbd = torch.block_diag(*r_blocks.unbind(0))[:out, :out]
        return rbd.T @ w
    rows = w.shape[0]
    blocks = w.reshape(rows, module.blocks, module.block_size)
    if module.embedding:
        rotated = torch.einsum("nrk,rkc->nrc", blocks, r_blocks)  # E R_bd
    else:
        rotated = torch.einsum("nrc,rkc->nrk", blocks, r_blocks)  # W R_bdᵀ
    out = rotated.reshape(rows, -1)
    if row_scale is not None:
        out = out * row_scale.reshape(-1, 1)
    return out


class OftGenerators:
    """For one tensor name, each OFT expert's stored generator blocks (None: not targeted)."""

    def __init__(self, experts: list[OftExpert], name: str, dtype: torch.dtype, device: torch.device):
        self.experts, self.name, self.dtype, self.device = experts, name, dtype, device
        targeting = [e for e in experts if name in e.modules]
        self.module = targeting[0].modules[name] if targeting else None
        self.convention = experts[0].convention

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        return self.experts[i].generator(self.name, self.dtype, self.device)

    def row_scale(self, i: int) -> torch.Tensor | None:
        return self.experts[i].row_scale(self.name, self.dtype, self.device)


def check_oft_conventions(experts: list[OftExpert]) -> None:
    """Generators can be merged only under one convention and one block geometry per module."""
    problems = []
    first = experts[0]
    for e in experts[1:]:
        if e.convention != first.convention:
            problems.append(
                f"{e.files.path}: OFT convention {e.convention} differs from {first.files.path}'s {first.convention}"
            )
        for name, mod in e.modules.items():
            other = next((x.modules[name] for x in experts if name in x.modules), None)
            if other is not None and (other.blocks, other.block_size, other.embedding) != (
                mod.blocks,
                mod.block_size,
                mod.embedding,
            ):
                problems.append(
                    f"{e.files.path}: module {name!r} has {mod.blocks} blocks of {mod.block_size}, another expert "
                    f"{other.blocks} of {other.block_size}"
                )
    collect(problems, InputError, "OFT adapters cannot be merged in the Lie algebra")
