"""What is merged: the inputs opened and checked against the base, every tensor's values resolved,
and the output cut into shards.

Tensors are taken in the base model's file and offset order so that reads are sequential. Every
check that the recipe, the config files and the safetensors headers allow runs here, before the
output folder is touched.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import settings
from ..errors import InputError, UsageError, collect
from ..io.checkpoint import Checkpoint, load_json
from ..io.experts import ExpertSource, open_expert
from ..io.peft_oft import OftExpert, check_oft_conventions
from ..io.safetensors_format import DTYPE_NAMES, FLOAT_DTYPES, itemsize
from ..methods import Method
from ..output_files import tokenizer_donor
from ..recipe import Recipe, TensorValues, parse_dtype

# config.json keys that must agree between the base and a full-model expert: tensors of the same
# shapes can still belong to another architecture or layer/vocabulary layout
ARCHITECTURE_KEYS = (
    "model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
    "num_key_value_heads",
)  # fmt: skip


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    merged: bool  # False: copied from the base (non-float tensors)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(base: Checkpoint, out_dtype: torch.dtype | None, shard_size: int) -> list[Shard]:
    """Output layout in base order; a shard holds ≤ shard_size bytes (one bigger tensor alone)."""
    tensors = []
    for name in base.names():
        info = base.info(name)
        merged = info.dtype in FLOAT_DTYPES
        dtype = DTYPE_NAMES[out_dtype] if (merged and out_dtype is not None) else info.dtype
        tensors.append(OutputTensor(name, dtype, info.shape, merged))
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def open_sources(recipe: Recipe) -> tuple[Checkpoint, list[ExpertSource], dict, int | None]:
    """The base (a stack of layer slices for passthrough), the experts, which source tensor each
    stacked output tensor is, and the stacked layer count; opened, not checked."""
    sources: dict = {}
    stacked_layers = None
    if recipe.slices is not None:
        from ..io.sliced import open_sliced

        base, sources, stacked_layers = open_sliced(recipe.slices, recipe.base)
    else:
        base = Checkpoint.open(recipe.base)
    problems, experts = [], []
    for e in recipe.experts:
        try:
            experts.append(open_expert(e.path, base, e.peft_version))
        except InputError as exc:
            problems.append(str(exc))
    collect(problems, InputError, "inputs")
    return base, experts, sources, stacked_layers


def check_config(base: Checkpoint, experts: list[ExpertSource]) -> None:
    """The experts' config.json agree with the base's on the architecture (one line each)."""
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(base.folder, name)
        if os.path.exists(path) and not isinstance(load_json(path), dict):
            raise InputError(f"{path}: not a JSON object")
    base_path = os.path.join(base.folder, "config.json")
    base_config = load_json(base_path) if os.path.exists(base_path) else None
    problems = []
    for e in experts:
        if not isinstance(e, Checkpoint):
            continue  # adapters: adapter_config.json is checked when they are opened
        path = os.path.join(e.folder, "config.json")
        if not os.path.exists(path):
            continue
        config = load_json(path)
        if not isinstance(config, dict):
            problems.append(f"{path}: not a JSON object")
            continue
        differ = [
            f"{key} is {config[key]!r}, the base's {base_config[key]!r}"
            for key in (ARCHITECTURE_KEYS if base_config is not None else ())
            if key in base_config and key in config and config[key] != base_config[key]  # type: ignore[operator]
        ]
        if differ:  # one line per expert: another architecture, whatever its tensors
            problems.append(f"{path}: " + "; ".join(differ))
    collect(problems, InputError, "experts' config.json do not match the base")


def check_compatible(base: Checkpoint, experts: list[ExpertSource]) -> None:
    """Every expert has the base's tensors, shapes, and castable dtypes (adapters: targets that
    exist and fit); all problems at once."""
    problems = []
    base_names = base.locations
    for ck in experts:
        if not isinstance(ck, Checkpoint):
            problems += ck.problems_against(base)
            continue
        names = ck.locations
        for n in base_names:
            b = base.info(n)
            if n not in names:
                if b.dtype in FLOAT_DTYPES:  # others are copied from the base (transformers ≥ 4.3x drops position_ids)
                    problems.append(f"{ck.folder}: tensor {n!r} is missing (it is in the base)")
                continue
            e = ck.info(n)
            if b.shape != e.shape:
                problems.append(f"{ck.file_of(n)}: tensor {n!r} has shape {list(e.shape)}, the base {list(b.shape)}")
            elif (b.dtype in FLOAT_DTYPES) != (e.dtype in FLOAT_DTYPES) or (
                b.dtype not in FLOAT_DTYPES and b.dtype != e.dtype
            ):
                problems.append(
                    f"{ck.file_of(n)}: tensor {n!r} has dtype {e.dtype}, not castable to the base's {b.dtype}"
                )
        problems += [f"{ck.file_of(n)}: tensor {n!r} is not in the base" for n in names if n not in base_names]
    collect(problems, InputError, "experts do not match the base")


def inputs_fingerprint(sources: list) -> dict:
    """File sizes and header digests of every input file (adapters: their config digest too)."""
    doc: dict = {}
    for src in sources:
        doc.update(src.fingerprint())
    return doc


@dataclass
class MergeInputs:
    """A validated merge: the recipe's method and values per tensor, the open inputs, the shards."""

    recipe: Recipe
    method: Method
    params: Any  # the method's parameters outside the layers (statistics passes use them)
    base: Checkpoint
    experts: list
    shards: list[Shard]
    values: dict[str, TensorValues]  # per merged tensor: gradients and filters resolved
    compute_dtype: torch.dtype
    out_dtype: torch.dtype | None
    generators: bool  # the method merges OFT experts' stored generators (Method.merges_generators)
    stacked_layers: int | None = None

    @property
    def sources(self) -> list:
        return [self.base, *self.experts]

    def merged_tensors(self) -> list[OutputTensor]:
        return [t for s in self.shards for t in s.tensors if t.merged]

    def model_values(self) -> tuple[dict[str, Any], ...]:
        """Each expert's values that a whole-model statistics pass takes (Method.statistics_values):
        one per expert, the same for every tensor."""
        keys = self.method.statistics_values
        distinct = {tuple(tuple(v.get(k) for k in keys) for v in tv.experts) for tv in self.values.values()}
        if len(distinct) > 1:
            raise UsageError(
                f"{self.method.name}: {', '.join(keys)} must be one value per expert for statistics over the whole "
                "model "
                "(no gradient or filter)"
            )
        row = distinct.pop() if distinct else tuple(tuple(None for _ in keys) for _ in self.recipe.experts)
        return tuple(dict(zip(keys, r)) for r in row)

    def close(self) -> None:
        for ck in self.sources:
            ck.close()


def resolve_values(
    recipe: Recipe, method: Method, name: str, sources: dict, n_layers: int, device_type: str
) -> TensorValues:
    """The recipe's values for one tensor, as the method runs them on `device_type`."""
    source = sources.get(name)
    if source is not None:  # a stacked layer: settings read with its source's name and place in its slice
        _, values = recipe.method_and_values(source.name, source.t)
        scale = settings.resolve([*source.levels, recipe.parameters.get("scale")], source.name, source.t)
        return dataclasses.replace(values, params=dataclasses.replace(values.params, scale=scale))
    _, values = recipe.method_and_values(name, settings.layer_fraction(name, n_layers))
    return dataclasses.replace(values, params=method.for_device(values.params, device_type))


def open_merge(recipe: Recipe, device_type: str) -> MergeInputs:
    """Validate the recipe, open and check every input, resolve every tensor's values; raises
    the project's errors, touching nothing on disk."""
    method, params = recipe.validate()
    compute_dtype = parse_dtype(recipe.compute_dtype, "compute_dtype")
    out_dtype = parse_dtype(recipe.dtype, "dtype")
    base, experts, sources, stacked_layers = open_sources(recipe)
    try:
        check_config(base, experts)
        check_compatible(base, experts)
        shards = plan_shards(base, out_dtype, recipe.shard_size)
        n_layers = settings.count_layers(base.names())
        values = {t.name: resolve_values(recipe, method, t.name, sources, n_layers, device_type)
                  for t in (t for s in shards for t in s.tensors) if t.merged}  # fmt: skip
        generators = method.merges_generators and all(isinstance(e, OftExpert) for e in experts)
        if generators:
            check_oft_conventions(experts)  # type: ignore[arg-type]
        tokenizer_donor(recipe)  # a tokenizer_source that cannot serve is refused before merging
        params = method.for_device(params, device_type)
        inputs = MergeInputs(recipe, method, params, base, experts, shards, values, compute_dtype, out_dtype,
                             generators, stacked_layers)  # fmt: skip
        if method.whole_model_statistics(inputs.params):
            inputs.model_values()  # refused now, not after the output folder is made
        return inputs
    except BaseException:
        for ck in (base, *experts):
            ck.close()
        raise
