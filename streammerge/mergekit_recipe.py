"""mergekit 0.1.5 recipes (YAML with `merge_method`), read with mergekit's semantics.

What a recipe means there is what it means here, defaults included, or it is refused with
one line naming the key and why. The rules taken from mergekit's source (config.py,
plan.py, parameter_resolver.py, merge_methods/):
- a model's parameter is looked up in its own `parameters`, then the top-level `parameters`,
  then the method's default; `weight` has no default (missing: refused, as there);
- values may be gradients and `filter:` lists (settings.py);
- `linear` averages every model listed, the base included; a `base_model` that is not
  listed is added as an input too and then needs a weight (mergekit does the same);
- the task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*) run as our
  `gta` method with mergekit's defaults (normalize, rescale, density 1.0, gamma 0.01,
  epsilon 0.15); a model equal to `base_model` is the base, not an expert;
- `dtype` is mergekit's compute dtype and the output's unless `out_dtype` is given. We compute
  in float32 even when it says bfloat16 or float16 (mergekit rounds every step to it): the
  one deliberate difference, which moves results by at most about one rounding step of it;
- `tokenizer_source: base` or a model path copies that model's tokenizer files when its
  vocabulary equals the base's; `union`, a different vocabulary (embedding surgery) and the
  `tokenizer:` block are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UsageError, did_you_mean
from .recipe import Expert, parse_dtype
from .methods.gta import MERGEKIT_GTA

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"}
REFUSED_KEYS = {
    "modules": "per-module definitions are not supported",
    "tokenizer": "the tokenizer block (added tokens, embedding surgery) is not supported; use tokenizer_source: base "
    "or a model path",
    "chat_template": "chat_template is not supported; the chosen tokenizer's own template is copied",
}
GTA_SHARED = {"normalize", "rescale", "lambda", "int8_mask"}
GTA_PER_MODEL = {"weight", "density", "gamma", "epsilon"}
METHODS_NOT_YET: tuple[str, ...] = ()


@dataclass(frozen=True)
class Contract:
    """mergekit's input contract and parameters of one method (its merge_methods/*.py)."""

    base: str  # "required"; "optional" (our `relative` parameter says if one was given); "ignored": one more input
    shared: frozenset[str]
    per_model: frozenset[str] = frozenset()
    non_base: tuple[int, int | None] = (1, None)  # how many models besides the base


CONTRACTS = {
    "linear": Contract("ignored", frozenset({"normalize", "weight"}), frozenset({"weight"})),
    "slerp": Contract("required", frozenset({"t"}), non_base=(1, 1)),
    "nuslerp": Contract(
        "optional", frozenset({"nuslerp_row_wise", "nuslerp_flatten", "weight"}), frozenset({"weight"}), (2, 2)
    ),
    "multislerp": Contract("optional", frozenset({"normalize_weights", "eps", "weight"}), frozenset({"weight"})),
    "karcher": Contract("ignored", frozenset({"max_iter", "tol"})),
    "model_stock": Contract("required", frozenset({"filter_wise"}), non_base=(2, None)),
    "sce": Contract("required", frozenset({"select_topk", "int8_mask"})),
    "nearswap": Contract("required", frozenset({"t"}), non_base=(1, 1)),
    "arcee_fusion": Contract("required", frozenset(), non_base=(1, 1)),
    "ram": Contract("required", frozenset({"epsilon"})),
    "ramplus_tl": Contract("required", frozenset({"r", "alpha", "epsilon"})),
}
GTA_CONTRACT = Contract("required", frozenset(GTA_SHARED | GTA_PER_MODEL), frozenset(GTA_PER_MODEL))


def _path(ref: Any, where: str) -> str:
    if isinstance(ref, dict) and set(ref) <= {"model"}:
        ref = ref.get("model")
    if not isinstance(ref, str) or not ref:
        raise UsageError(f"{where}: a model is a path (got {ref!r})")
    if "+" in ref:
        raise UsageError(
            f"{where}: {ref!r}: the model+lora syntax is not supported; pass the PEFT adapter folder as the model"
        )
    return ref


def parse(doc: dict, where: str) -> dict[str, Any]:
    """Recipe fields (recipe.Recipe) for a mergekit YAML document."""
    problems = [f"mergekit key '{key}': {REFUSED_KEYS[key]}" for key in doc if key in REFUSED_KEYS]
    unknown = sorted(set(doc) - TOP_KEYS - set(REFUSED_KEYS))
    if unknown:
        guess = did_you_mean(unknown, TOP_KEYS)
        problems.append(
            f"unknown mergekit key(s) {', '.join(unknown)}{guess} (read here: {', '.join(sorted(TOP_KEYS))})"
        )
    if problems:  # every key at once
        raise UsageError(f"{where}: " + "; ".join(problems))
    method = str(doc["merge_method"])
    if method == "passthrough":
        return _passthrough(doc, where) | _dtypes(doc, where)
    if "slices" in doc:
        if "models" in doc:
            raise UsageError(f"{where}: give either 'slices' or 'models'")
        doc = {**{k: v for k, v in doc.items() if k != "slices"}, "models": _whole_model_slices(doc["slices"], where)}
    if method in METHODS_NOT_YET:
        raise UsageError(
            f"{where}: merge_method {method!r} is mergekit's but not implemented here yet (see README, mergekit "
            "features)"
        )
    if method not in CONTRACTS and method not in MERGEKIT_GTA:
        guess = did_you_mean([method], set(CONTRACTS) | set(MERGEKIT_GTA))
        raise UsageError(f"{where}: unknown merge_method {method!r}{guess}")
    contract = CONTRACTS.get(method, GTA_CONTRACT)
    base = _path(doc["base_model"], f"{where}: base_model") if doc.get("base_model") is not None else None
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise UsageError(f"{where}: 'models' must be a non-empty list")
    shared = dict(doc.get("parameters") or {})
    bad = sorted(set(shared) - contract.shared)
    if bad:
        raise UsageError(
            f"{where}: parameters: {', '.join(bad)} not a parameter of mergekit's {method}"
            f"{did_you_mean(bad, contract.shared)} (known: {', '.join(sorted(contract.shared)) or 'none'})"
        )
    entries: list[tuple[str, dict]] = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
            raise UsageError(f"{where}: models[{i}] is a mapping with 'model' and optional 'parameters'")
        path = _path(m["model"], f"{where}: models[{i}]")
        p = dict(m.get("parameters") or {})
        bad = sorted(set(p) - contract.per_model)
        if bad:
            raise UsageError(
                f"{where}: model {path}: {', '.join(bad)} not a per-model parameter of mergekit's {method}"
                f"{did_you_mean(bad, contract.per_model)} (known: {', '.join(sorted(contract.per_model)) or 'none'})"
            )
        entries.append((path, p))
    return _fields(method, contract, base, entries, shared, where) | _dtypes(doc, where)


def _fields(
    method: str, contract: Contract, base: str | None, entries: list[tuple[str, dict]], shared: dict, where: str
) -> dict[str, Any]:
    if contract.base == "required" and base is None:
        raise UsageError(f"{where}: merge_method {method} needs base_model")
    if contract.base == "ignored" or (contract.base == "optional" and base is None):
        if base is not None and base not in [p for p, _ in entries]:
            entries = entries + [(base, {})]  # mergekit adds an unlisted base_model as one more input (plan.py)
        inputs = entries
    else:
        inputs = [(p, q) for p, q in entries if p != base]  # the base among the models is the base, not an expert
    low, high = contract.non_base
    if len(inputs) < low or (high is not None and len(inputs) > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        raise UsageError(f"{where}: merge_method {method} takes {want} model(s) besides the base, got {len(inputs)}")
    for path, p in inputs:
        if "weight" in contract.per_model and "weight" not in p and "weight" not in shared:
            raise UsageError(
                f"{where}: model {path} has no weight (mergekit's {method} requires one per input"
                + (", and adds base_model as an input" if path == base else "")
                + ")"
            )
    experts = tuple(
        Expert(
            path,
            weight=p.get("weight"),
            density=p.get("density"),
            parameters={k: v for k, v in p.items() if k in ("gamma", "epsilon")},
        )
        for path, p in inputs
    )
    if method in CONTRACTS:
        params = dict(shared)
        if contract.base == "optional":
            params["relative"] = base is not None
        return {
            "method": method,
            "base": base or inputs[0][0],
            "experts": experts,
            "parameters": params,
            "_implied": ("relative",),
        }
    sparsify, consensus, normalize, rescale = MERGEKIT_GTA[method]
    given = set(shared) | {k for _, p in inputs for k in p}
    if "gamma" in given and sparsify != "magnitude_outliers":
        raise UsageError(f"{where}: gamma is a parameter of breadcrumbs only")
    if "epsilon" in given and sparsify != "della_magprune":
        raise UsageError(f"{where}: epsilon is a parameter of della only")
    implied = {"sparsify": sparsify, "consensus": consensus, "normalize": normalize, "rescale": rescale}
    return {
        "method": "gta",
        "base": base,
        "experts": experts,
        "parameters": implied | shared,
        "_implied": tuple(k for k in implied if k not in shared),
    }


def _whole_model_slices(slices: Any, where: str) -> list[dict]:
    """mergekit's `slices:` form of a merge of whole models (its README's slerp example: one slice
    whose sources each span all of their model's layers) as the equivalent `models:` list; a slice
    over part of the layers (merging within slices) is refused with how to write it."""
    how = "write the merge with 'models:' (whole models), or stack layers with merge_method passthrough"
    if (
        not isinstance(slices, list)
        or len(slices) != 1
        or not isinstance(slices[0], dict)
        or set(slices[0]) != {"sources"}
    ):
        raise UsageError(f"{where}: slices with a merge method other than passthrough: only one slice of whole "
                         f"models is supported; {how}")  # fmt: skip
    models = []
    for i, src in enumerate(slices[0]["sources"] or []):
        if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
            raise UsageError(f"{where}: slices[0].sources[{i}] is a mapping with model, layer_range and parameters")
        path = _path(src["model"], f"{where}: slices[0].sources[{i}]")
        layers = _layer_count(path)
        span = src.get("layer_range")
        if layers is None or span != [0, layers]:
            have = f"{layers} layers" if layers is not None else "no num_hidden_layers in its config.json"
            raise UsageError(f"{where}: slices[0].sources[{i}]: layer_range {span} of {path} ({have}) is not the "
                             f"whole model; merging within slices is not supported: {how}")  # fmt: skip
        models.append({"model": path, **({"parameters": src["parameters"]} if src.get("parameters") else {})})
    return models


def _layer_count(path: str) -> int | None:
    import json
    import os

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            value = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _passthrough(doc: dict, where: str) -> dict[str, Any]:
    """Stacked layer slices, or one model (scaled): exactly one input per slice, as in mergekit."""
    from .io.sliced import parse_slices

    shared = dict(doc.get("parameters") or {})
    if set(shared) - {"scale"}:
        raise UsageError(
            f"{where}: parameters: {', '.join(sorted(set(shared) - {'scale'}))} not a parameter of mergekit's "
            "passthrough (known: scale)"
        )
    base = _path(doc["base_model"], f"{where}: base_model") if doc.get("base_model") is not None else None
    if ("slices" in doc) == ("models" in doc):
        raise UsageError(f"{where}: passthrough takes either 'slices' or 'models'")
    if "slices" in doc:
        slices = parse_slices(doc["slices"], where)
        return {
            "method": "passthrough",
            "base": base or slices[0]["model"],
            "experts": (),
            "slices": slices,
            "parameters": shared,
        }
    models = doc["models"]
    if not isinstance(models, list) or len(models) != 1 or base is not None and _path(models[0], where) != base:
        raise UsageError(f"{where}: passthrough takes exactly one model (base_model counts as one)")
    m = models[0] if isinstance(models[0], dict) else {"model": models[0]}
    if set(m.get("parameters") or {}) - {"scale"}:
        raise UsageError(f"{where}: model {m['model']}: passthrough takes only scale")
    scale = (m.get("parameters") or {}).get("scale")
    path = _path(m["model"], f"{where}: models[0]")
    slices = ({"model": path, "layer_range": None, "scale": scale, "slice_scale": None},)
    return {"method": "passthrough", "base": path, "experts": (), "slices": slices, "parameters": shared}


def _dtypes(doc: dict, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dtype, out_dtype = doc.get("dtype"), doc.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        parse_dtype(value, f"{where}: {key}")
    if dtype is not None and parse_dtype(dtype, "dtype") == parse_dtype("float64", "dtype"):
        out["compute_dtype"] = "float64"
    if out_dtype or dtype:
        out["dtype"] = str(out_dtype or dtype)
    if doc.get("tokenizer_source") is not None:
        source = doc["tokenizer_source"]
        if source == "union":
            raise UsageError(
                f"{where}: tokenizer_source: union (a merged vocabulary with embedding surgery) is not supported; use "
                "base or a model path"
            )
        out["tokenizer_source"] = _path(source, f"{where}: tokenizer_source") if source != "base" else "base"
    return out
