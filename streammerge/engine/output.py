"""The output folder: its fingerprint, prepared for a new merge or a resume (or cleared with
--restart), the inputs watched for changes, and finished with the index written last.

A folder holds a complete merge exactly when its index exists: the index is written after every
shard, the config, tokenizer and card are in place and the journal says complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from ..errors import InputError, ResumeError
from ..io.atomic import TMP_SUFFIX, os_error, temp_name, write_bytes_atomic
from ..io.checkpoint import INDEX_NAME, file_identity, load_json
from ..io.journal import Journal, journal_path
from ..io.lock import PID_NAME
from ..output_files import CARD_NAME, CONFIG_FILES, MERGEKIT_CONFIG_NAME, TOKENIZER_FILES, copy_model_files, write_card
from .inputs import MergeInputs, inputs_fingerprint
from .placement import Placement

log = logging.getLogger(__name__)


def fingerprint(inputs: MergeInputs, device_type: str) -> tuple[str, dict, dict]:
    """What a resume must match: the recipe's meaning, the device kind, and the input files."""
    recipe_doc = inputs.recipe.fingerprint_doc() | {"device_type": device_type}
    files = inputs_fingerprint(inputs.sources)
    blob = json.dumps({"recipe": recipe_doc, "inputs": files}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), recipe_doc, files


def _clear(out: str, old: Journal) -> None:
    ours = set(old.shards) | {INDEX_NAME, CARD_NAME, MERGEKIT_CONFIG_NAME, *CONFIG_FILES, *TOKENIZER_FILES}
    for f in os.listdir(out):
        if f in ours or f.endswith(TMP_SUFFIX):
            os.remove(os.path.join(out, f))
    os.remove(old.path)
    log.info("--restart: removed the previous merge in %s", out)


def refusal(out: str, old: Journal, recipe_doc: dict, files: dict) -> str:
    """Why the merge in `out` cannot be resumed by this command: the input file that changed since
    (size, modification time or inode: rsync's quick check), or the recipe."""
    if any(isinstance(v, dict) and "size" in v and "mtime_ns" not in v for v in old.inputs.values()):
        return (
            f"{out}: holds a merge started by an earlier streammerge, whose record lacks the input files' times; "
            "pass --restart to merge again"
        )
    commits = {ref.split("@")[0]: ref.split("@")[1] for _, ref in recipe_doc.get("origins", ())}
    for _, ref in old.recipe.get("origins", ()):
        repo, was = ref.split("@")
        if commits.get(repo, was) != was:
            return (
                f"{repo}: is now at commit {commits[repo][:12]}, the merge in {out} was started from commit "
                f"{was[:12]}; pass --restart to merge the new commit, or name the old one as {repo}@{was}"
            )
    for path, now in files.items():
        before = old.inputs.get(path)
        if before is not None and before != now:
            return (
                f"{path}: changed since the merge in {out} started (its finished shards were merged from the old "
                "contents); pass --restart to merge again from the current files"
            )
    same_recipe = json.dumps(old.recipe, sort_keys=True) == json.dumps(recipe_doc, sort_keys=True, default=list)
    what = "other inputs" if same_recipe else "a different recipe"
    return f"{out}: holds a merge of {what}; pass --restart to discard it and start over"


def prepare(inputs: MergeInputs, placement: Placement, restart: bool) -> Journal:
    """The journal of a new merge, or of the one this folder holds (its finished shards checked,
    its devices reused); refuses a folder that holds anything else."""
    out = inputs.recipe.out
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".streammerge-probe" + TMP_SUFFIX)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise os_error(exc, out) from None
    digest, recipe_doc, files = fingerprint(inputs, placement.device.type)
    jpath = journal_path(out)
    names = [s.filename for s in inputs.shards]
    if os.path.exists(jpath):
        old = Journal.load(jpath)
        if old.fingerprint == digest and old.shards == names:
            keep = os.path.basename(temp_name(os.path.join(out, old.partial["shard"]))) if old.partial else None
            for tmp in os.listdir(out):
                if tmp.endswith(TMP_SUFFIX) and tmp != keep:
                    os.remove(os.path.join(out, tmp))
            old.finished = {
                n: v
                for n, v in old.finished.items()
                if os.path.isfile(os.path.join(out, n)) and os.path.getsize(os.path.join(out, n)) == v["size"]
            }
            placement.reuse(old.placement)
            return old
        if not restart and (old.finished or old.partial):
            raise ResumeError(refusal(out, old, recipe_doc, files))
        if not restart:
            log.info("%s: replacing a merge of another recipe or other inputs that had not finished a shard", out)
        _clear(out, old)
    else:
        foreign = [f for f in os.listdir(out) if not f.endswith(TMP_SUFFIX) and f != PID_NAME]
        if foreign:
            raise ResumeError(
                f"{out}: not empty and not a streammerge output ({foreign[0]!r} ...); choose another folder"
            )
    journal = Journal(jpath, digest, recipe_doc, files, names)
    journal.placement = placement.devices()
    journal.save()
    return journal


def file_state(paths: list[str]) -> dict[str, dict | None]:
    """Each file's identity as the fingerprint records it (None: gone)."""
    state: dict[str, dict | None] = {}
    for f in paths:
        try:
            state[f] = file_identity(f)
        except OSError:
            state[f] = None
    return state


class InputWatch:
    """Refuses to go on once an input file changed under the merge."""

    def __init__(self, inputs: MergeInputs):
        self.paths = list(inputs_fingerprint(inputs.sources))
        self.initial = file_state(self.paths)

    def check(self) -> None:
        if file_state(self.paths) != self.initial:
            changed = next(p for p in self.paths if file_state([p]) != {p: self.initial[p]})
            raise InputError(
                f"{changed}: changed during the merge; the shards merged from the old contents no longer match — "
                "rerun with --restart"
            )


def finish(inputs: MergeInputs, journal: Journal, report=None) -> None:
    """Config, tokenizer, card and report in place, the journal complete, then the index."""
    recipe, out = inputs.recipe, inputs.recipe.out
    copy_model_files(recipe, out)
    write_card(recipe, out)
    config_path = os.path.join(out, "config.json")
    if (inputs.out_dtype is not None or inputs.stacked_layers is not None) and os.path.isfile(config_path):
        config = load_json(config_path)
        if inputs.out_dtype is not None:  # under both names: transformers 5 reads `dtype`, earlier ones `torch_dtype`
            config["torch_dtype"] = config["dtype"] = str(inputs.out_dtype).removeprefix("torch.")
        if inputs.stacked_layers is not None:
            config["num_hidden_layers"] = inputs.stacked_layers
        write_bytes_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    if report is not None:
        header = {"method": inputs.method.name, "experts": len(inputs.experts), "recipe": journal.recipe}
        report.finish(header, [t.name for t in inputs.merged_tensors()])
    journal.complete = True
    journal.save()
    shards = inputs.shards
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards), "merged_by": "streammerge"},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }
    write_bytes_atomic(os.path.join(out, INDEX_NAME), (json.dumps(index, indent=2) + "\n").encode())
