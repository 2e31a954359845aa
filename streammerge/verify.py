"""`streammerge verify OUT`: is this a complete, intact merge?

Checks the index against the shard files and their headers, that every tensor of the base is
present with the right shape and dtype, every shard's sha256 against the merge record, and
that no temporary file is left. All problems are reported together.
"""

from __future__ import annotations

import hashlib
import os

from .errors import InputError, collect
from .io.atomic import TMP_SUFFIX
from .io.checkpoint import INDEX_NAME, Checkpoint, load_json
from .io.journal import Journal, journal_path
from .io.safetensors_format import DTYPE_NAMES, FLOAT_DTYPES, read_header
from .recipe import parse_dtype
from .units import format_size


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def verify_adapter(out: str) -> str:
    """An `--output-format adapter` output: its config parses, its weights' header matches the
    file, and every tensor is finite."""
    import json

    import torch
    from safetensors import safe_open

    from .io.peft_adapter import CONFIG_NAME, WEIGHTS_NAME

    problems = []
    try:
        with open(os.path.join(out, CONFIG_NAME), encoding="utf-8") as f:
            if not isinstance(json.load(f), dict):
                problems.append(f"{out}/{CONFIG_NAME}: not a JSON object")
    except (OSError, ValueError) as exc:
        problems.append(f"{out}/{CONFIG_NAME}: unreadable ({exc})")
    path = os.path.join(out, WEIGHTS_NAME)
    header = read_header(path)  # raises InputError naming the file if the header and size disagree
    with safe_open(path, "pt") as sf:
        for name in sf.keys():
            if not bool(torch.isfinite(sf.get_tensor(name)).all()):
                problems.append(f"{path}: tensor {name!r} contains NaN or Inf")
    collect(problems, InputError, f"{out}: verification failed")
    return f"{out}: OK — merged adapter, {len(header.tensors)} tensors, {format_size(os.path.getsize(path))}"


def loader_file_problems(out: str, recipe: dict, merged: Checkpoint) -> list[str]:
    """What a loader needs besides the tensors: the config files the base had, agreeing with the
    tensors, and the tokenizer files of the base (or of the recipe's tokenizer_source)."""
    from .output_files import CONFIG_FILES, TOKENIZER_FILES
    from .settings import count_layers

    base = recipe.get("base", "")
    source = recipe.get("tokenizer_source")
    donor = base if source in (None, "base") else source
    problems = [
        f"{out}/{f}: missing (the base has it; loaders need it)"
        for f in CONFIG_FILES
        if os.path.isfile(os.path.join(base, f)) and not os.path.isfile(os.path.join(out, f))
    ]
    problems += [
        f"{out}/{f}: missing ({'the base' if donor == base else donor} has it; the tokenizer needs it)"
        for f in TOKENIZER_FILES
        if os.path.isfile(os.path.join(donor, f)) and not os.path.isfile(os.path.join(out, f))
    ]
    config_path = os.path.join(out, "config.json")
    config = load_json(config_path) if os.path.isfile(config_path) else None
    if not isinstance(config, dict):
        return problems
    embed = next((n for n in merged.names() if n.endswith("embed_tokens.weight")), None)
    expected = {"num_hidden_layers": count_layers(merged.names())}
    if embed is not None and len(merged.info(embed).shape) == 2:
        expected["vocab_size"], expected["hidden_size"] = merged.info(embed).shape
    for key, value in expected.items():
        if key in config and value and config[key] != value:
            problems.append(f"{config_path}: {key} is {config[key]!r}, the tensors say {value}")
    return problems


def verify_output(out: str) -> str:
    out = os.path.abspath(out)
    if out.endswith(".gguf") and os.path.isfile(out):
        from .gguf_output import verify_gguf

        return verify_gguf(out)
    if not os.path.exists(out):
        raise InputError(f"{out}: no such folder")
    if not os.path.isdir(out):
        raise InputError(f"{out}: not a folder (a merge's output is a folder)")
    from .io.peft_adapter import WEIGHTS_NAME

    if os.path.isfile(os.path.join(out, WEIGHTS_NAME)) and not os.path.isfile(os.path.join(out, INDEX_NAME)):
        return verify_adapter(out)
    if not os.path.isfile(journal_path(out)):
        raise InputError(f"{out}: no streammerge.json: not a streammerge output")
    journal = Journal.load(journal_path(out))
    if not os.path.isfile(os.path.join(out, INDEX_NAME)):
        raise InputError(f"{out}: no {INDEX_NAME}: the merge is not complete (rerun its command to resume)")
    problems: list[str] = []
    leftovers = [f for f in os.listdir(out) if f.endswith(TMP_SUFFIX)]
    problems += [f"{out}/{f}: temporary file left behind" for f in leftovers]
    if not journal.complete:
        problems.append(f"{journal.path}: the record does not mark the merge complete")
    merged = Checkpoint.open(out)  # index ↔ files ↔ headers (raises on any inconsistency)
    index = load_json(os.path.join(out, INDEX_NAME))
    data_bytes = sum(i.nbytes for _, i in merged.locations.values())
    if index.get("metadata", {}).get("total_size") not in (None, data_bytes):
        problems.append(
            f"{INDEX_NAME}: total_size {index['metadata']['total_size']} but the shards hold {data_bytes} bytes"
        )
    files = sorted(os.path.basename(f) for f in merged.files)
    if files != sorted(journal.shards):
        problems.append(f"shards {files} differ from the recorded {sorted(journal.shards)}")
    base = Checkpoint.open(journal.recipe["base"])
    out_dtype = parse_dtype(journal.recipe.get("dtype"), "dtype")
    for name in base.names():
        b = base.info(name)
        if name not in merged.locations:
            problems.append(f"tensor {name!r} of the base is missing")
            continue
        m = merged.info(name)
        want = DTYPE_NAMES[out_dtype] if (out_dtype is not None and b.dtype in FLOAT_DTYPES) else b.dtype
        if m.shape != b.shape or m.dtype != want:
            problems.append(
                f"{merged.file_of(name)}: tensor {name!r} is {list(m.shape)} {m.dtype}, expected {list(b.shape)} {want}"
            )
    extra = set(merged.names()) - set(base.names())
    problems += [f"{merged.file_of(n)}: tensor {n!r} is not in the base" for n in sorted(extra)]
    for f in merged.files:
        record = journal.finished.get(os.path.basename(f))
        if record is None:
            problems.append(f"{f}: not recorded as finished")
        elif os.path.getsize(f) != record["size"] or sha256_of(f) != record["sha256"]:
            problems.append(f"{f}: checksum differs from the one recorded when it was written")
    problems += loader_file_problems(out, journal.recipe, merged)
    merged.close()
    base.close()
    collect(problems, InputError, f"{out}: verification failed")
    counts = f"{len(merged.files)} shard(s), {len(merged.locations)} tensors, {format_size(data_bytes)}"
    return f"{out}: OK — {counts}, checksums match"
