"""A merge written as a PEFT LoRA adapter: the merged update W − W₀ of every linear weight as its
best rank-r approximation, mergekit-extract-lora's meaning applied to our dense merge, computed one
matrix at a time from the dense merge's own tensors (no dense copy on disk).

Per tensor of the base, in its order:
- a linear layer's weight: ΔW = W − W₀ (W as the dense merge would store it, both in float32),
  U S Vᵀ its SVD, r = min(--rank, singular values above --sv-epsilon, the fewest whose share of
  Σ s² reaches --energy); A = √S_r V_rᵀ,
  B = U_r √S_r (mergekit's --distribute-scale) and `lora_alpha` = r, so PEFT's scale is 1 and
  B A = U_r S_r V_rᵀ, the best rank-r approximation (Eckart–Young). Modules with r below --rank go
  in `rank_pattern`/`alpha_pattern`, as mergekit writes them.
- a linear layer whose bias changed: the whole merged layer (weight and bias) in `modules_to_save`,
  exact. PEFT's `lora_bias` would be the compact form, but it gives every target a bias and
  `merge_and_unload` then fails on layers that have none (mergekit writes `lora_B.bias` without it,
  and PEFT drops those updates).
- embeddings and lm_head (--embeddings): `full` (default, as mergekit): the merged tensor whole,
  in `modules_to_save`; `lora`: decomposed like a linear weight (an embedding's update transposed,
  as PEFT's `lora_embedding_A/B` hold it); `skip`: left out (the adapter keeps the base's).
- any other tensor that changed (norms): the merged tensor whole, in `modules_to_save`.
- a tensor the merge left equal to the base's: left out.
Factors are stored in the output dtype (the base's unless --dtype). `OUT/lora_report.json` gives
per decomposed tensor its rank and the share of the update's energy (Σ kept s² / Σ s²) kept.

Resumable: the adapter tensors of each output shard of the dense plan are written to
`OUT/.lora-parts/` as that shard is finished, under a journal of the recipe's fingerprint; a rerun
continues after the last finished part, and the parts are joined into `adapter_model.safetensors`
at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch

from .errors import ResourceError, ResumeError, UsageError
from .io.atomic import ShardWriter, write_bytes_atomic
from .io.checkpoint import Checkpoint
from .io.lock import PID_NAME
from .io.peft_adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .io.safetensors_format import DTYPE_NAMES
from .units import format_size

log = logging.getLogger(__name__)
PARTS = ".lora-parts"
JOURNAL = ".lora-journal.json"
REPORT = "lora_report.json"
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_NAMES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class LoraOptions:
    rank: int
    sv_epsilon: float = 0.0
    embeddings: str = "full"  # full, lora or skip
    energy: float = 1.0  # keep the smallest rank whose share of Σ s² reaches this (capped by `rank`)

    def check(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--rank {self.rank}: a LoRA rank is at least 1")
        if self.embeddings not in ("full", "lora", "skip"):
            raise UsageError(f"--embeddings {self.embeddings}: choose full, lora or skip")
        if not 0 < self.energy <= 1:
            raise UsageError(f"--energy {self.energy}: a share of the update's energy, in (0, 1]")


def _kind(name: str, shape: tuple[int, ...]) -> str:
    """What a tensor becomes: linear, bias, embedding, output (lm_head) or whole."""
    module = name.rsplit(".", 1)[0]
    leaf = module.rsplit(".", 1)[-1]
    if name.endswith(".weight") and len(shape) == 2:
        return "embedding" if leaf in EMBEDDING_NAMES else "output" if leaf in OUTPUT_NAMES else "linear"
    if name.endswith(".bias") and len(shape) == 1 and leaf not in EMBEDDING_NAMES:
        return "bias"
    return "whole"


def decompose(
    delta: torch.Tensor, rank: int, sv_epsilon: float, energy: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, r, energy kept) of a float32 update: B A its best rank-r approximation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    total = float((s.double() ** 2).sum())
    if energy < 1 and total > 0:  # the first r whose cumulative share reaches `energy`
        share = (s.double() ** 2).cumsum(0) / total
        r = min(r, int((share < energy).sum()) + 1)
    r = max(r, 1)  # PEFT needs r ≥ 1; a zero update gives zero factors
    kept = float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :], r, kept


class LoraWriter:
    """Turns each merged tensor into the adapter's tensors (see the module docstring)."""

    def __init__(self, base: Checkpoint, options: LoraOptions, compute_dtype: torch.dtype, merge_again, state: dict):
        self.base, self.options, self.compute_dtype = base, options, compute_dtype
        self.merge_again = merge_again  # name -> the merged tensor, computed once more
        # what the parts written so far hold (the journal's record of them)
        self.targets: dict[str, int] = dict(state["targets"])  # decomposed module -> rank
        self.saved: set[str] = set(state["saved"])  # modules_to_save
        self.report: dict[str, dict] = dict(state["report"])

    def state(self) -> dict:
        return {"targets": self.targets, "saved": sorted(self.saved), "report": self.report}

    def convert(self, name: str, merged: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        base = self.base.get(name, dtype=None)
        kind = _kind(name, tuple(merged.shape))
        module = name.rsplit(".", 1)[0]
        if torch.equal(merged, base.to(merged.dtype)) and not (kind == "linear" and module in self.saved):
            return []
        policy = self.options.embeddings if kind in ("embedding", "output") else None
        if policy == "skip":
            return []
        if kind == "bias" and module not in self.saved:
            self.saved.add(module)  # the whole layer, exact (see the module docstring)
            weight = module + ".weight"
            if module in self.targets:  # already decomposed: its factors are dropped when the parts are joined
                del self.targets[module]
                self.report.pop(weight, None)
                return [(PREFIX + name, merged), (PREFIX + weight, self.merge_again(weight))]
            return [(PREFIX + name, merged)]
        if kind in ("whole", "bias") or policy == "full" or module in self.saved:
            self.saved.add(module)
            return [(PREFIX + name, merged)]
        delta = merged.to(self.compute_dtype) - base.to(self.compute_dtype)
        embedding = kind == "embedding"
        o = self.options
        a, b, r, kept = decompose(delta.T if embedding else delta, o.rank, o.sv_epsilon, o.energy)
        self.targets[module] = r
        self.report[name] = {"rank": r, "energy_kept": kept}
        stem = PREFIX + module + (".lora_embedding_" if embedding else ".lora_")
        suffix = "" if embedding else ".weight"
        return [
            (stem + "A" + suffix, a.to(merged.dtype).contiguous()),
            (stem + "B" + suffix, b.to(merged.dtype).contiguous()),
        ]

    def config(self, base_name: str) -> dict:
        rank = self.options.rank
        pattern = {m: r for m, r in self.targets.items() if r != rank}
        return {
            "base_model_name_or_path": base_name, "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": pattern,
            "target_modules": sorted(self.targets), "modules_to_save": sorted(self.saved) or None,
            "use_rslora": False, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True, "bias": "none",
        }  # fmt: skip


def fingerprint(merger, options: LoraOptions) -> str:
    from .engine.output import fingerprint as dense_fingerprint

    digest, _, _ = dense_fingerprint(merger.inputs, merger.device.type)
    return hashlib.sha256(f"{digest} {options}".encode()).hexdigest()


def check_and_fetch(merger) -> None:
    """Everything a LoRA merge can refuse before --out is made; then Hub inputs' weights."""
    inputs = merger.inputs
    if inputs.method.whole_model_statistics(inputs.params):
        raise UsageError(f"{inputs.method.name} with statistics over the whole model: --output-format lora "
                         "merges per tensor; use per-tensor settings or the dense output")  # fmt: skip
    merger.plan.check_memory()
    plan = merger.plan
    need = plan.peak_host + svd_bytes(merger)
    if need > plan.ram_budget:
        raise ResourceError(f"the merge and the largest update's SVD need {format_size(need)} of RAM, the budget is "
                            f"{format_size(plan.ram_budget)}")  # fmt: skip
    merger.download_inputs()


def merge_to_lora(merger, options: LoraOptions, restart: bool) -> tuple[str, dict]:
    """Run the merge `merger` plans and write its LoRA adapter to the recipe's `out` (checked by
    check_and_fetch first)."""
    inputs = merger.inputs
    out = inputs.recipe.out
    ours = {PARTS, JOURNAL, WEIGHTS_NAME, CONFIG_NAME, REPORT, PID_NAME}
    foreign = sorted(set(os.listdir(out)) - ours) if os.path.isdir(out) else []
    if foreign:
        raise ResumeError(f"{out}: holds {foreign[0]!r}, not a streammerge LoRA output; choose another folder")
    if restart and os.path.isdir(out):
        shutil.rmtree(os.path.join(out, PARTS), ignore_errors=True)
        for f in set(os.listdir(out)) & ours:
            if f != PID_NAME:
                os.remove(os.path.join(out, f))
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    digest = fingerprint(merger, options)
    jpath = os.path.join(out, JOURNAL)
    journal = {"fingerprint": digest, "done": [], "targets": {}, "saved": [], "report": {}}
    if os.path.exists(jpath):
        with open(jpath) as f:
            old = json.load(f)
        if old.get("fingerprint") == digest:
            journal = old
        elif not restart:
            raise ResumeError(f"{out}: holds a LoRA merge of other inputs or options; pass --restart to start over")
    computer = merger.computer()
    tensors_by_name = {t.name: t for t in inputs.merged_tensors()}
    writer = LoraWriter(inputs.base, options, inputs.compute_dtype,
                        lambda name: computer.merge(tensors_by_name[name], None), journal)  # fmt: skip
    for shard in inputs.shards:
        part = os.path.join(out, PARTS, shard.filename)
        if shard.filename in journal["done"] and os.path.exists(part):
            continue
        tensors = []
        for t in shard.tensors:
            tensors += writer.convert(t.name, computer.merge(t, None))  # as the dense merge stores it
        layout = [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors]
        with ShardWriter(part, layout, {"format": "pt"}) as w:
            for k, v in tensors:
                w.write(k, v)
            w.commit()
        journal["done"].append(shard.filename)
        journal |= writer.state()
        write_bytes_atomic(jpath, json.dumps(journal).encode())
        log.info("%s: %d adapter tensors", shard.filename, len(tensors))
    return _join(out, inputs, writer), writer.report


def _join(out: str, inputs, writer: LoraWriter) -> str:
    """The parts as one adapter_model.safetensors (without the factors of layers that ended whole
    in modules_to_save), its config and report; the parts removed."""
    parts = [Checkpoint.open_file(os.path.join(out, PARTS, s.filename)) for s in inputs.shards]

    def kept(key: str) -> bool:
        return not (".lora_" in key and key[len(PREFIX) :].split(".lora_")[0] in writer.saved)

    try:
        layout = [(n, p.info(n).dtype, p.info(n).shape) for p in parts for n in p.names() if kept(n)]
        with ShardWriter(os.path.join(out, WEIGHTS_NAME), layout, {"format": "pt"}) as w:
            for p in parts:
                for n in filter(kept, p.names()):
                    w.write(n, p.get(n, dtype=None))
            w.commit()
    finally:
        for p in parts:
            p.close()
    hub = dict(inputs.recipe.origins)
    config = writer.config(hub.get(inputs.recipe.base, os.path.abspath(inputs.recipe.base)))
    write_bytes_atomic(os.path.join(out, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode())
    write_bytes_atomic(os.path.join(out, REPORT), (json.dumps(writer.report, indent=1) + "\n").encode())
    shutil.rmtree(os.path.join(out, PARTS))
    os.remove(os.path.join(out, JOURNAL))
    return out


def summary(report: dict) -> str:
    kept = sorted(v["energy_kept"] for v in report.values())
    if not kept:
        return "no linear weight changed"
    return (f"{len(kept)} updates decomposed; energy kept: min {kept[0]:.4f}, median {kept[len(kept) // 2]:.4f} "
            f"(per tensor in {REPORT})")  # fmt: skip


def svd_bytes(merger) -> int:
    """The SVD's working set on top of the dense plan: the update and its factors (float32)."""
    largest = max((t for t in merger.inputs.merged_tensors() if len(t.shape) == 2),
                  key=lambda t: t.shape[0] * t.shape[1], default=None)  # fmt: skip
    if largest is None:
        return 0
    m, n = largest.shape
    k = min(m, n)
    return 4 * (2 * m * n + m * k + k * n + k)


def plan_line(merger) -> str:
    return f"LoRA output: one SVD at a time, up to {format_size(svd_bytes(merger))} on top of the dense plan"
