"""Recipe files: our YAML and mergekit's (mergekit_recipe.py), read into a Recipe, with what the
file says about how to run (`ray:`), which is a run option, not part of the merge."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import mergekit_recipe
from .errors import InputError, UsageError, did_you_mean
from .recipe import Expert, Recipe

RUN_KEYS = ("ray",)  # keys of our recipe files that choose how to run (engine.RunOptions), not what to merge


def _expert(entry: Any, where: str) -> Expert:
    if isinstance(entry, str):
        return Expert(entry)
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: each expert is a path or a mapping with 'path'")
    known = {"path", "weight", "density", "peft_version", "parameters"}
    if set(entry) - known or "path" not in entry:
        raise UsageError(
            f"{where}: expert entry {entry!r} needs 'path' and may have 'weight', 'density', 'peft_version', "
            "'parameters'"
        )
    version = entry.get("peft_version")
    extra = entry.get("parameters") or {}
    if not isinstance(extra, dict):
        raise UsageError(f"{where}: expert {entry['path']}: 'parameters' is a mapping")
    return Expert(
        str(entry["path"]),
        entry.get("weight"),
        entry.get("density"),
        None if version is None else str(version),
        dict(extra),
    )


def from_mapping(
    doc: Any, where: str, overrides: dict[str, Any] | None = None, default_out: str | None = None
) -> Recipe:
    """A Recipe from a parsed YAML document, native or mergekit-style; `overrides` win;
    `default_out` serves where neither names an output folder (plan)."""
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: a recipe is a mapping")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    experts = doc.get("experts")
    moe_experts = isinstance(experts, list) and any(
        isinstance(e, dict) and ({"source_model", "positive_prompts"} & set(e)) for e in experts
    )
    if "gate_mode" in doc or moe_experts:
        raise UsageError(
            f"{where}: a mergekit-moe recipe (gate_mode, experts with source_model/positive_prompts): "
            "mixture-of-experts models are not supported; streammerge merges into one dense model"
        )
    if "merge_method" in doc and overrides.get("method"):
        raise UsageError(
            f"{where}: --method cannot change a mergekit recipe's merge_method (its parameters mean what mergekit "
            "says); edit merge_method in the file, or write the merge as our recipe"
        )
    try:
        fields_ = mergekit_recipe.parse(doc, where) if "merge_method" in doc else _native(doc, where)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    implied = fields_.pop("_implied", ())
    if overrides.get("method") and overrides["method"] != fields_.get("method"):
        # another method than the recipe's: drop what the recipe's method implied, keep what the user wrote
        fields_["parameters"] = {k: v for k, v in fields_.get("parameters", {}).items() if k not in implied}
    fields_.update(overrides)
    if not fields_.get("out") and default_out:
        fields_["out"] = default_out
    if not fields_.get("out"):
        raise UsageError(f"{where}: no output folder (give 'out' in the recipe or --out)")
    if not fields_.get("base"):
        raise UsageError(f"{where}: no base model")
    return Recipe(**fields_)


_NATIVE_KEYS = {
    "method",
    "base",
    "experts",
    "out",
    "parameters",
    "dtype",
    "compute_dtype",
    "shard_size",
    "seed",
    "allow_nonfinite",
    "tokenizer_source",
    "slices",
    *RUN_KEYS,
}


def _native(doc: dict, where: str) -> dict[str, Any]:
    unknown = sorted(set(doc) - _NATIVE_KEYS)
    if unknown:
        guess = did_you_mean(unknown, _NATIVE_KEYS)
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)}{guess} (known: {', '.join(sorted(_NATIVE_KEYS))})"
        )
    if "method" not in doc:
        raise UsageError(f"{where}: no 'method'")
    out = {k: doc[k] for k in doc if k not in ("experts", "parameters", "slices", *RUN_KEYS)}
    if "slices" in doc:
        from .io.sliced import parse_slices

        out["slices"] = parse_slices(doc["slices"], where)
        out.setdefault("base", out["slices"][0]["model"])
    out["experts"] = tuple(_expert(e, where) for e in (doc.get("experts") or []))
    out["parameters"] = dict(doc.get("parameters") or {})
    return out


def load_recipe_file(path: str, overrides: dict[str, Any] | None = None, default_out: str | None = None) -> Recipe:
    """The recipe of a YAML file (its run settings, if any, dropped: read_recipe_file has them)."""
    return read_recipe_file(path, overrides, default_out)[0]


def read_recipe_file(
    path: str, overrides: dict[str, Any] | None = None, default_out: str | None = None
) -> tuple[Recipe, dict[str, Any]]:
    """(the recipe, the run settings the file gives: {"ray": …} where it says where to run)."""
    import yaml  # a YAML recipe is the file format users bring from mergekit

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        doc = yaml.safe_load(text)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid YAML (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        what = "; ".join(str(p) for p in (getattr(exc, "problem", None), getattr(exc, "context", None)) if p)
        raise UsageError(f"{where}: not valid YAML ({what or str(exc).splitlines()[0]})") from None
    recipe = dataclasses.replace(from_mapping(doc, path, overrides, default_out), recipe_text=text)
    run = {k: doc[k] for k in RUN_KEYS if isinstance(doc, dict) and doc.get(k) is not None}
    return recipe, run
