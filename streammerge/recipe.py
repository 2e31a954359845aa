"""What to merge: the Recipe value and its validation (recipe_files.py reads it from YAML)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UsageError, collect
from . import settings
from .methods import REQUIRED, Method, build_params, get_method, param_kind
from .units import parse_size

DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
DEFAULT_SHARD_SIZE = 5_000_000_000


def parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if str(name).lower() not in DTYPE_ALIASES:
        raise UsageError(f"{what}: unknown dtype {name!r} (use bfloat16, float16, float32 or float64)")
    return DTYPE_ALIASES[str(name).lower()]


def expert_count_problems(method: Method, n: int) -> list[str]:
    """How many experts the method takes (Method.min_experts, max_experts), checked with the recipe."""
    low, high = method.min_experts, method.max_experts
    if low <= n and (high is None or n <= high):
        return []
    if high is None:
        return ["at least one expert is needed" if low == 1 else f"{method.name} takes at least {low} experts, got {n}"]
    if high == 0:
        return [f"{method.name} takes one model (or layer slices) and no experts, got {n}"]
    return [f"{method.name} takes exactly {low} expert(s), got {n}" if low == high else
            f"{method.name} takes {low} to {high} experts, got {n}"]  # fmt: skip


@dataclass(frozen=True)
class Expert:
    """One expert and its own settings (settings.py: a value, a gradient or filters). A setting
    left None falls back to the recipe's parameter of that name, then the method's default."""

    path: str
    weight: Any = None  # None: the recipe's `weight`, else the method's default (1.0; mergekit methods require one)
    density: Any = None  # per-expert keep rate for ties/dare (mergekit's `density`)
    peft_version: str | None = None  # OFT adapters without `peft_version` in their config
    parameters: dict[str, Any] = field(default_factory=dict)  # other per-expert settings (gamma, epsilon)

    def setting(self, key: str) -> Any:
        return getattr(self, key) if key in ("weight", "density") else self.parameters.get(key)


@dataclass(frozen=True)
class TensorValues:
    """The recipe resolved for one tensor: the method's parameters and each expert's values."""

    params: Any
    experts: tuple[dict[str, Any], ...]

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(float(v.get("weight", 1.0)) for v in self.experts)  # methods without weights: 1 each

    @property
    def densities(self) -> tuple[float | None, ...]:
        return tuple(v.get("density") for v in self.experts)


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
    tokenizer_source: str | None = None  # "base" (None) or a model folder whose tokenizer files are copied
    slices: tuple[dict, ...] | None = (
        None  # passthrough layer stacking (io/sliced.py); `base` then gives config and tokenizer
    )
    recipe_text: str | None = field(default=None, compare=False)  # the YAML as given, for the model card
    # Hub inputs (engine/remote.py): (cache folder, "org/name@commit") each; the commit is part of
    # what a resume must match
    origins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Accept human sizes and lists from Python callers; the value stays immutable.
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))
        object.__setattr__(self, "experts", tuple(Expert(e) if isinstance(e, str) else e for e in self.experts))
        object.__setattr__(self, "parameters", dict(self.parameters))
        if self.slices is not None:
            object.__setattr__(self, "slices", tuple(dict(s) for s in self.slices))

    def resolve(self) -> tuple[Method, Any]:
        """The method and its parameters as they apply outside the layers (t = 0, no tensor name
        matched by a filter); raises UsageError."""
        method, values = self.method_and_values("", 0.0)
        return method, values.params

    def method_and_values(self, tensor_name: str, t: float) -> tuple[Method, TensorValues]:
        """The method, its parameters and every expert's values for one tensor (settings.py)."""
        method, implied = get_method(self.method)
        where = f"method {self.method}" + (f", tensor {tensor_name}" if tensor_name else "")
        shared = {}
        for key, setting in self.parameters.items():
            if key in method.expert_params and key not in method.shared_params:
                continue  # a default for every expert (mergekit's top-level `weight`), resolved below
            kind = param_kind(method.params_type, key)
            value = setting if key in method.literal_params else settings.evaluate(setting, tensor_name, t, kind,
                                                                                   f"{where}: {key}")  # fmt: skip
            if value is not None:
                shared[key] = value
        params = build_params(method.params_type, {**implied, **shared}, where, method.param_hints)
        experts = []
        for e in self.experts:
            values = {}
            for key, default in method.expert_params.items():
                value = settings.resolve([e.setting(key), self.parameters.get(key)], tensor_name, t, "float",
                                         f"{where}: expert {e.path}: {key}")  # fmt: skip
                if value is None:
                    if default is REQUIRED:
                        raise UsageError(
                            f"{where}: expert {e.path} has no '{key}' (this method requires one per model, as "
                            "mergekit does)"
                        )
                    value = default
                values[key] = value
            unknown = sorted(set(e.parameters) - set(method.expert_params))
            unknown += [k for k in ("weight", "density") if e.setting(k) is not None and k not in method.expert_params]
            if unknown:
                raise UsageError(
                    f"{where}: expert {e.path}: unknown per-expert parameter(s) {', '.join(unknown)} (known: "
                    f"{', '.join(method.expert_params)})"
                )
            for key, value in values.items():  # every per-expert value is a number (or unset)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise UsageError(f"{where}: expert {e.path}: {key} must be a number, not {value!r}")
            if isinstance(values.get("weight"), (int, float)) and not math.isfinite(float(values["weight"])):
                raise UsageError(f"{where}: expert {e.path}: weight {values['weight']} is not finite")
            if values.get("density") is not None and not 0 < float(values["density"]) <= 1:
                raise UsageError(f"{where}: expert {e.path}: density {values['density']} is outside (0, 1]")
            experts.append(values)
        return method, TensorValues(params, tuple(experts))

    def validate(self) -> tuple[Method, Any]:
        """Every recipe-level problem at once; returns what `resolve` returns."""
        problems: list[str] = []
        resolved = None
        literal: set[str] = set()
        try:
            method = get_method(self.method)[0]
            literal = method.literal_params
            problems += expert_count_problems(method, len(self.experts))  # first: before values per expert
        except UsageError:
            pass  # reported below
        for key, setting in self.parameters.items():
            if key in literal:
                continue
            try:
                settings.check_setting(setting, f"parameter {key}")
            except UsageError as exc:
                problems.append(str(exc))
        for e in self.experts:
            for key in ("weight", "density", *e.parameters):
                try:
                    settings.check_setting(e.setting(key), f"expert {e.path}: {key}")
                except UsageError as exc:
                    problems.append(str(exc))
        if not problems:
            try:
                method, values = self.method_and_values("", 0.0)
                resolved = (method, values.params)
                try:
                    method.check_experts(values.params, values.experts)  # raises ValueError
                except ValueError as exc:
                    problems.append(f"method {method.name}: {exc}")
            except UsageError as exc:
                problems.append(str(exc))
        if self.slices is not None and self.method != "passthrough":
            problems.append(f"layer slices go with method passthrough, not {self.method}")
        for what, name in (("dtype", self.dtype), ("compute_dtype", self.compute_dtype)):
            try:
                parse_dtype(name, what)
            except UsageError as exc:
                problems.append(str(exc))
        out = os.path.realpath(self.out)
        for src in [self.base] + [e.path for e in self.experts] + [s["model"] for s in self.slices or ()]:
            src_real = os.path.realpath(src)
            if out == src_real or out.startswith(src_real + os.sep):
                problems.append(f"output folder {self.out} is (inside) input folder {src}")
        collect(problems, UsageError, "recipe")
        assert resolved is not None
        return resolved

    def fingerprint_doc(self) -> dict[str, Any]:
        """What identifies this merge's result (not where it is written)."""
        method, params = self.resolve()
        doc = dataclasses.asdict(self)
        doc.pop("out")
        doc.pop("recipe_text")
        if not self.origins:
            doc.pop("origins")  # local inputs only: the same record as before Hub inputs existed
        doc["method"] = method.name
        doc["parameters"] = dataclasses.asdict(params)
        doc["base"] = os.path.realpath(self.base)
        doc["experts"] = [dict(dataclasses.asdict(e), path=os.path.realpath(e.path)) for e in self.experts]
        doc["settings"] = self.parameters  # gradients and filters as written (parameters above: their t = 0 values)
        return doc

    def to_json(self) -> str:
        return json.dumps(self.fingerprint_doc() | {"out": os.path.realpath(self.out)}, indent=2, sort_keys=True)
