"""PEFT LoRA adapters as experts: W_i = W₀ + ΔW per targeted module, computed when read.

ΔW = s · B A with s = α/r (α/√r with rsLoRA); r is read from the tensor shapes, α from
`alpha_pattern` or `lora_alpha`. Embeddings: ΔE = s · (B A)ᵀ. `fan_in_fan_out` transposes ΔW.
DoRA (`use_dora`): W' = diag(m / ‖W₀ + ΔW‖_row) (W₀ + ΔW) for Linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .checkpoint import Checkpoint
from .peft_adapter import AdapterExpert, pattern_value

SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class LoraModule:
    a_key: str
    b_key: str
    scale: float
    embedding: bool
    magnitude_key: str | None


class LoraExpert(AdapterExpert):
    kind = "lora"

    def __init__(self, folder: str, base: Checkpoint):
        super().__init__(folder, base)
        cfg = self.files.config
        where = self.files.path
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise InputError(f"{where}: adapter_config.json says peft_type {cfg.get('peft_type')!r}, not LORA")
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.modules: dict[str, LoraModule] = {}  # base weight name -> module
        for module, keys in self.files.modules(SUFFIXES).items():
            weight = module + ".weight"
            emb = "lora_embedding_A" in keys
            a_key, b_key = (
                (keys.get("lora_embedding_A"), keys.get("lora_embedding_B"))
                if emb
                else (keys.get("lora_A.weight"), keys.get("lora_B.weight"))
            )
            if a_key is None or b_key is None:
                self.problems.append(f"{where}: module {module!r} has only one of the LoRA A/B matrices")
                continue
            if weight not in base.locations:
                self.problems.append(f"{where}: targets {module!r}, which the base has no {weight!r} for")
                continue
            a_shape, b_shape = self.files.tensors.info(a_key).shape, self.files.tensors.info(b_key).shape
            rank = a_shape[0]
            out_f, in_f = base.info(weight).shape if len(base.info(weight).shape) == 2 else (-1, -1)
            want_b, want_a = ((in_f, rank), (rank, out_f)) if emb else ((out_f, rank), (rank, in_f))
            if self.fan_in_fan_out and not emb:
                want_b, want_a = (in_f, rank), (rank, out_f)
            if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
                self.problems.append(
                    f"{where}: module {module!r}: LoRA A {list(a_shape)} / B {list(b_shape)} do not fit base "
                    f"{weight!r} {list(base.info(weight).shape)}"
                )
                continue
            alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            magnitude = keys.get("lora_magnitude_vector")
            if magnitude is not None and emb:
                self.problems.append(f"{where}: module {module!r}: DoRA on embeddings is not supported")
                continue
            self.modules[weight] = LoraModule(a_key, b_key, scale, emb, magnitude)
        for key in self.files.unknown_keys(SUFFIXES):
            self.problems.append(
                f"{where}: tensor {key!r} is not a LoRA parameter (modules_to_save heads are not supported)"
            )
        if not self.modules and not self.problems:
            self.problems.append(f"{where}: no LoRA modules found")

    def delta(self, name: str, dtype: torch.dtype, device, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """scale · B A for module `name` (rows [start, stop) of it only: B's rows, or A's columns
        where the layout is transposed)."""
        m = self.modules[name]
        a = self.files.tensors.get(m.a_key, dtype, device)
        b = self.files.tensors.get(m.b_key, dtype, device)
        if m.embedding or self.fan_in_fan_out:
            d = (b @ a).T if rows is None else a[:, rows[0] : rows[1]].T @ b.T
        else:
            d = b @ a if rows is None else b[rows[0] : rows[1]] @ a
        return d.mul_(m.scale)

    def factors(self, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B', A') with τ = B' A' in torch layout [out, in] (the scale folded into B'), for methods
        that can work on the factors (an SVD in O((m + n) r²)); None where τ is not low-rank that
        way (DoRA rescales rows). A module the adapter does not target has rank 0."""
        shape = self.base.info(name).shape
        if name not in self.modules:
            return (
                torch.zeros(shape[0], 0, dtype=dtype, device=device),
                torch.zeros(0, shape[-1], dtype=dtype, device=device),
            )
        m = self.modules[name]
        if m.magnitude_key is not None:
            return None
        a = self.files.tensors.get(m.a_key, dtype, device)
        b = self.files.tensors.get(m.b_key, dtype, device)
        if m.embedding or self.fan_in_fan_out:  # τ = (b a)ᵀ = aᵀ bᵀ
            return a.T.mul(m.scale), b.T.contiguous()
        return b.mul_(m.scale), a

    def get(
        self, name: str, dtype: torch.dtype = torch.float32, device="cpu", rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        w = self.base.get(name, dtype, device, rows)
        if name not in self.modules:
            return w
        w.add_(self.delta(name, dtype, device, rows))
        m = self.modules[name]
        if m.magnitude_key is not None:  # DoRA: per output row, so rows stay independent
            mag = self.files.tensors.get(m.magnitude_key, dtype, device)
            if rows is not None:
                mag = mag[rows[0] : rows[1]]
            norm = w.norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
            w.mul_((mag / norm).unsqueeze(1))
        return w
