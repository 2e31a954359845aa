"""What to merge: the Recipe value, its YAML forms (ours and mergekit's), and its validation."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError, UsageError, collect
from .methods import Method, build_params, get_method
from .units import parse_size

DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
DEFAULT_SHARD_SIZE = 5_000_000_000


def parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if str(name).lower() not in DTYPE_ALIASES:
        raise UsageError(f"{what}: unknown dtype {name!r} (use bfloat16, float16, float32 or float64)")
    return DTYPE_ALIASES[str(name).lower()]


@dataclass(frozen=True)
class Expert:
    path: str
    weight: float = 1.0
    density: float | None = None  # per-expert keep rate for ties/dare (mergekit's `density`)
    peft_version: str | None = None  # OFT adapters without `peft_version` in their config


@dataclass(frozen=True)
class Recipe:
    method: str
    base: str
    experts: tuple[Expert, ...]
    out: str
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # output dtype; None keeps the base's per tensor
    compute_dtype: str = "float32"
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        # Accept human sizes and lists from Python callers; the value stays immutable.
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))
        object.__setattr__(self, "experts", tuple(Expert(e) if isinstance(e, str) else e for e in self.experts))
        object.__setattr__(self, "parameters", dict(self.parameters))

    def resolve(self) -> tuple[Method, Any]:
        """The method and its validated parameters dataclass (raises UsageError)."""
        method, implied = get_method(self.method)
        return method, build_params(method.params_type, {**implied, **self.parameters}, f"method {self.method}")

    def validate(self) -> tuple[Method, Any]:
        """Every recipe-level problem at once; returns what `resolve` returns."""
        problems: list[str] = []
        resolved = None
        try:
            resolved = self.resolve()
        except UsageError as exc:
            problems.append(str(exc))
        if not self.experts:
            problems.append("at least one expert is needed")
        for e in self.experts:
            if not math.isfinite(e.weight):
                problems.append(f"expert {e.path}: weight {e.weight} is not finite")
            if e.density is not None and not 0 < e.density <= 1:
                problems.append(f"expert {e.path}: density {e.density} is outside (0, 1]")
        for what, name in (("dtype", self.dtype), ("compute_dtype", self.compute_dtype)):
            try:
                parse_dtype(name, what)
            except UsageError as exc:
                problems.append(str(exc))
        out = os.path.realpath(self.out)
        for src in [self.base] + [e.path for e in self.experts]:
            src_real = os.path.realpath(src)
            if out == src_real or out.startswith(src_real + os.sep):
                problems.append(f"output folder {self.out} is (inside) input folder {src}")
        if resolved is not None and getattr(resolved[1], "normalize", False) and self.experts and sum(e.weight for e in self.experts) == 0:
            problems.append("linear: the expert weights sum to zero, so they cannot be normalised")
        collect(problems, UsageError, "recipe")
        assert resolved is not None
        return resolved

    def fingerprint_doc(self) -> dict[str, Any]:
        """What identifies this merge's result (not where it is written)."""
        method, params = self.resolve()
        doc = dataclasses.asdict(self)
        doc.pop("out")
        doc["method"] = method.name
        doc["parameters"] = dataclasses.asdict(params)
        doc["base"] = os.path.realpath(self.base)
        doc["experts"] = [dict(dataclasses.asdict(e), path=os.path.realpath(e.path)) for e in self.experts]
        return doc

    def to_json(self) -> str:
        return json.dumps(self.fingerprint_doc() | {"out": os.path.realpath(self.out)}, indent=2, sort_keys=True)


def _expert(entry: Any, where: str) -> Expert:
    if isinstance(entry, str):
        return Expert(entry)
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: each expert is a path or a mapping with 'path'")
    known = {"path", "weight", "density", "peft_version"}
    if set(entry) - known or "path" not in entry:
        raise UsageError(f"{where}: expert entry {entry!r} needs 'path' and may have 'weight', 'density', 'peft_version'")
    version = entry.get("peft_version")
    return Expert(str(entry["path"]), float(entry.get("weight", 1.0)), _opt_float(entry.get("density")), None if version is None else str(version))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def from_mapping(doc: Any, where: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """A Recipe from a parsed YAML document, native or mergekit-style; `overrides` win."""
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: a recipe is a mapping")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        fields_ = _mergekit(doc, where) if "merge_method" in doc else _native(doc, where)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    fields_.update(overrides)
    if not fields_.get("out"):
        raise UsageError(f"{where}: no output folder (give 'out' in the recipe or --out)")
    if not fields_.get("base"):
        raise UsageError(f"{where}: no base model")
    return Recipe(**fields_)


_NATIVE_KEYS = {"method", "base", "experts", "out", "parameters", "dtype", "compute_dtype", "shard_size", "seed", "allow_nonfinite"}


def _native(doc: dict, where: str) -> dict[str, Any]:
    unknown = sorted(set(doc) - _NATIVE_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_NATIVE_KEYS))})")
    if "method" not in doc:
        raise UsageError(f"{where}: no 'method'")
    out = {k: doc[k] for k in doc if k not in ("experts", "parameters")}
    out["experts"] = tuple(_expert(e, where) for e in (doc.get("experts") or []))
    out["parameters"] = dict(doc.get("parameters") or {})
    return out


# mergekit parameter names -> ours, per method family.
_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}


def _mergekit(doc: dict, where: str) -> dict[str, Any]:
    """mergekit's YAML: merge_method, base_model, models[{model, parameters{weight, density}}]."""
    unknown = sorted(set(doc) - _MERGEKIT_KEYS)
    if unknown:
        raise UsageError(f"{where}: mergekit keys not supported here: {', '.join(unknown)}")
    method = str(doc["merge_method"])
    base = doc.get("base_model")
    if isinstance(base, dict):
        base = base.get("model")
    params = dict(doc.get("parameters") or {})
    experts = []
    for m in doc.get("models") or []:
        path = m.get("model") if isinstance(m, dict) else m
        p = (m.get("parameters") if isinstance(m, dict) else None) or {}
        if base is not None and str(path) == str(base):
            continue  # mergekit lets the base appear among the models; it is not an expert
        unknown_p = sorted(set(p) - {"weight", "density"})
        if unknown_p:
            raise UsageError(f"{where}: model {path}: unsupported per-model parameter(s) {', '.join(unknown_p)}")
        experts.append(Expert(str(path), float(p.get("weight", 1.0)), _opt_float(p.get("density"))))
    if method in ("linear", "task_arithmetic"):
        normalize = params.pop("normalize", method == "linear")
        if method == "task_arithmetic" and normalize:
            total = sum(e.weight for e in experts)
            experts = [dataclasses.replace(e, weight=e.weight / total) for e in experts]
        elif method == "linear":
            params["normalize"] = bool(normalize)
    elif method in ("ties", "dare_ties", "dare_linear"):
        normalize = params.pop("normalize", True)
        if method != "dare_linear":
            params["merge"] = "mean" if normalize else "sum"
        if method.startswith("dare") and "density" in params:
            params["drop_rate"] = 1.0 - float(params.pop("density"))
    out: dict[str, Any] = {"method": method, "base": base, "experts": tuple(experts), "parameters": params}
    dtype = doc.get("out_dtype") or doc.get("dtype")
    if dtype:
        out["dtype"] = str(dtype)
    return out


def load_recipe_file(path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    import yaml  # a YAML recipe is the file format users bring from mergekit

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return from_mapping(doc, path, overrides)
