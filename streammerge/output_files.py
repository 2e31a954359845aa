"""The files of a merged model besides its shards: config from the base, tokenizer from the
base or the recipe's `tokenizer_source`, and a model card (README.md) written without network."""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version

from .errors import InputError
from .io.atomic import copy_atomic, write_bytes_atomic
from .io.checkpoint import load_json
from .recipe import Recipe

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CARD_NAME = "README.md"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"  # a mergekit recipe, as mergekit writes it beside its output


def tokenizer_donor(recipe: Recipe) -> str:
    """The folder whose tokenizer files are copied: the base, or `tokenizer_source` if its
    vocabulary is the base's (a different one would need embedding surgery: refused)."""
    source = recipe.tokenizer_source
    if source in (None, "base"):
        return recipe.base
    if not os.path.isdir(source):
        raise InputError(f"{source}: tokenizer_source is not a folder")
    if not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        raise InputError(f"{source}: tokenizer_source has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    if _vocabulary(source) != _vocabulary(recipe.base):
        raise InputError(
            f"{source}: tokenizer_source has a vocabulary other than the base's; the embeddings would need "
            "re-indexing (mergekit's embedding surgery), which is not supported"
        )
    return source


def _vocabulary(folder: str) -> object:
    """What identifies a tokenizer's token ↔ id mapping."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        doc = load_json(path)
        if not isinstance(doc, dict):
            raise InputError(f"{path}: not a JSON object")
        model = doc.get("model") or {}
        return (
            "tokenizer.json",
            json.dumps(model.get("vocab"), sort_keys=True),
            json.dumps(model.get("merges")),
            json.dumps([(t.get("id"), t.get("content")) for t in doc.get("added_tokens") or []]),
        )
    for name in ("tokenizer.model", "vocab.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return (name, f.read())
    return None


def copy_model_files(recipe: Recipe, out: str) -> None:
    """config and generation config from the base, tokenizer files from the donor."""
    for name in CONFIG_FILES:
        src = os.path.join(recipe.base, name)
        if os.path.isfile(src):
            copy_atomic(src, os.path.join(out, name))
    donor = tokenizer_donor(recipe)
    for name in TOKENIZER_FILES:
        src = os.path.join(donor, name)
        if os.path.isfile(src):
            copy_atomic(src, os.path.join(out, name))


def streammerge_version() -> str:
    try:
        return version("streammerge")
    except PackageNotFoundError:
        return "unknown"


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as the user gave it (a file), else our YAML form of the command line."""
    if recipe.recipe_text:
        return recipe.recipe_text.rstrip() + "\n"
    import yaml

    hub = dict(recipe.origins)
    doc = {
        "method": recipe.method,
        "base": hub.get(recipe.base, recipe.base),
        "experts": [
            {
                k: v
                for k, v in (("path", hub.get(e.path, e.path)), ("weight", e.weight), ("density", e.density))
                if v is not None
            }  # fmt: skip
            for e in recipe.experts
        ],
        "parameters": recipe.parameters,
    }
    if recipe.dtype:
        doc["dtype"] = recipe.dtype
    return yaml.safe_dump(doc, sort_keys=False)


def mergekit_method(recipe: Recipe) -> str | None:
    """A mergekit recipe's `merge_method` as written (it may run as our `gta`); None for ours."""
    if not recipe.recipe_text:
        return None
    import yaml

    try:
        doc = yaml.safe_load(recipe.recipe_text)
    except yaml.YAMLError:
        return None
    return str(doc["merge_method"]) if isinstance(doc, dict) and "merge_method" in doc else None


def method_asked(recipe: Recipe, asked: str | None) -> str:
    """The method as the user named it (`asked`: a mergekit recipe's merge_method)."""
    return f"{asked}` (a mergekit recipe, with mergekit 0.1.5's meaning)" if asked else f"{recipe.method}`"


def write_card(recipe: Recipe, out: str) -> None:
    asked = mergekit_method(recipe)
    hub = dict(recipe.origins)  # a Hub input is named by its repo id (and commit), not its cache folder

    def name(path: str) -> str:
        return hub.get(path, path)

    experts = "\n".join(
        f"- `{name(e.path)}`" + (f" (weight {e.weight})" if e.weight is not None else "") for e in recipe.experts
    )
    import yaml

    # the front matter the Hub reads: every input as base_model (a repo id without its commit)
    front = {
        "base_model": [name(p).split("@")[0] for p in (recipe.base, *(e.path for e in recipe.experts))],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "streammerge"],
    }
    text = (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
        "# Merged model\n\n"
        f"This model was merged with streammerge {streammerge_version()}, "
        f"method `{method_asked(recipe, asked)}, into the base model `{name(recipe.base)}`.\n\n"
        f"## Models merged\n\n{experts}\n\n"
        f"## Recipe\n\n```yaml\n{recipe_yaml(recipe)}```\n"
    )
    write_bytes_atomic(os.path.join(out, CARD_NAME), text.encode())
    if asked is not None:  # Hub tooling reads a mergekit recipe here (as the user wrote it)
        write_bytes_atomic(os.path.join(out, MERGEKIT_CONFIG_NAME), recipe_yaml(recipe).encode())
