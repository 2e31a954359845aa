"""OrthoMerge of PEFT OFT adapters written as one merged PEFT adapter (not a dense model).

The merged generator Q* of every adapted module is packed in PEFT ≥ 0.16's layout
(`oft_R.weight` [r, b(b−1)/2]) and written with the first expert's adapter_config.json
(`block_share` off), so `peft.PeftModel.from_pretrained(base, OUT)` loads it and applies it
with the experts' own Cayley flag. Adapters are small: this runs in memory, files atomically.
"""

from __future__ import annotations

import json
import os

import torch

from .errors import InputError, ResumeError, UsageError
from .io.atomic import ShardWriter, write_bytes_atomic
from .io.peft_adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .io.peft_oft import OftExpert, OftGenerators, check_oft_conventions
from .math.skew import pack_skew
from .methods.orthomerge import merged_generator
from . import settings
from .recipe import Recipe
from .engine.inputs import open_sources


def _open(recipe: Recipe):
    method, _ = recipe.validate()
    if not method.merges_generators:
        raise UsageError(
            "--output-format adapter writes OrthoMerge of PEFT OFT adapters as one adapter: --method orthomerge "
            "(any method's merge as a LoRA adapter: --output-format lora --rank R)"
        )
    base, experts, _, _ = open_sources(recipe)
    problems = [
        p
        for e in experts
        for p in (e.problems_against(base) if isinstance(e, OftExpert) else [f"{e.folder}: not an OFT adapter"])
    ]
    if problems:
        raise InputError("adapter output needs OFT adapters:\n  " + "\n  ".join(problems))
    check_oft_conventions(experts)  # type: ignore[arg-type]
    if experts[0].convention.fmt != "packed":
        raise InputError(f"{experts[0].files.path}: adapters of PEFT < 0.16 cannot be written back; use dense output")
    return base, experts


def adapter_plan(recipe: Recipe) -> str:
    """What an adapter merge holds: every module's packed output until the file is written, plus
    one module's N generators and about 4 accumulators (float64 on the CPU)."""
    from .units import format_size

    base, experts = _open(recipe)
    try:
        modules = {}
        for e in experts:
            modules.update(e.modules)  # type: ignore[union-attr]
        out_bytes = sum(m.blocks * m.block_size * (m.block_size - 1) // 2 * 4 for m in modules.values())
        work = max((m.blocks * m.block_size**2 * 8 * (len(experts) + 4) for m in modules.values()), default=0)
        return (
            f"adapter output: {len(modules)} modules from {len(experts)} OFT adapters, {format_size(out_bytes)} "
            "written;\n"
            f"peak working set about {format_size(out_bytes + work)} (outputs held until written, one module's "
            "generators)"
        )
    finally:
        base.close()
        for e in experts:
            e.close()


def merge_to_adapter(recipe: Recipe) -> str:
    base, experts = _open(recipe)
    try:
        out = recipe.out
        os.makedirs(out, exist_ok=True)
        foreign = [f for f in os.listdir(out) if f not in (WEIGHTS_NAME, CONFIG_NAME, "streammerge.json")]
        if foreign:
            raise ResumeError(f"{out}: not empty and not a streammerge adapter output ({foreign[0]!r} ...)")
        names = [n for n in base.names() if any(n in e.modules for e in experts)]  # type: ignore[union-attr]
        n_layers = settings.count_layers(base.names())
        tensors = []
        for name in names:
            _, values = recipe.method_and_values(name, settings.layer_fraction(name, n_layers))
            weights, params = values.weights, values.params
            gens = OftGenerators(
                experts,
                name,
                torch.float64 if params.precision == "auto" else getattr(torch, params.precision),
                torch.device("cpu"),
            )  # type: ignore[arg-type]
            q_star = merged_generator(gens, weights, params, gens.dtype, gens.device)
            suffix = "oft_embedding_R.weight" if gens.module.embedding else "oft_R.weight"
            tensors.append(
                (PREFIX + name[: -len(".weight")] + "." + suffix, pack_skew(q_star).to(torch.float32).contiguous())
            )
        layout = [(k, "F32", tuple(t.shape)) for k, t in tensors]
        with ShardWriter(os.path.join(out, WEIGHTS_NAME), layout, {"format": "pt"}) as w:
            for k, t in tensors:
                w.write(k, t)
            w.commit()
        config = dict(experts[0].files.config) | {
            "block_share": False,
            "base_model_name_or_path": os.path.abspath(recipe.base),
        }  # type: ignore[union-attr]
        write_bytes_atomic(os.path.join(out, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode())
        write_bytes_atomic(os.path.join(out, "streammerge.json"), (recipe.to_json() + "\n").encode())
        return out
    finally:
        base.close()
        for e in experts:
            e.close()
