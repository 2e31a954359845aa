"""The inputs' first bytes read while the command starts: `streammerge merge` spends its first
seconds importing torch (1.9-2.1 s of a cold 0.5 B task-arithmetic merge's 8-10 s on this project's
2-core machine, before its first read: bench/results/README.md, "Round thirteen"), on one core, with
the disk idle. A thread started before that import reads the start of each local input named on the
command line (or in its recipe) into the page cache, in the order a merge reads them: the base's
files and then each expert's, chunk by chunk in turn, every file from its first byte (a merge takes
tensors in the base's file and offset order: engine/inputs.py). The read-ahead (prefetch.py) finds
those bytes in the page cache and copies them from there instead of reading the disk; `stop`, called
as it starts, ends this thread, so the two never compete for the disk.

Only a hint: what it cannot find (Hub repo ids, a recipe it cannot read) it leaves out, and nothing
here raises; the command checks its inputs as before. No imports beyond the standard library (and
PyYAML, which the recipe needs anyway), so that it starts before torch is imported.
"""

from __future__ import annotations

import json
import os
import threading

CHUNK = 8 << 20  # bytes read from one input before the next input's turn
LIMIT = 2 << 30  # at most this much in all, and at most a quarter of the memory available
_stop = threading.Event()

VALUE_FLAGS = ("--base", "--expert", "--recipe")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def start(argv: list[str]) -> threading.Thread | None:
    """Start reading the inputs of `streammerge merge` ARGV (argv[0] the subcommand) in a thread;
    None where there is nothing to read or no way to read it here."""
    if not argv or argv[0] != "merge" or {"--ray", "--help", "-h"} & set(argv) or not hasattr(os, "preadv"):
        return None
    try:
        files = [model_files(p) for p in input_paths(argv[1:])]
    except Exception:  # a hint: the command itself reports what is wrong with its inputs
        return None
    files = [f for f in files if f]
    if not files:
        return None
    _stop.clear()
    thread = threading.Thread(target=read, args=(files, limit()), name="early-read", daemon=True)
    thread.start()
    return thread


def stop() -> None:
    """End the reading (the merge's own reads are starting)."""
    _stop.set()


def input_paths(args: list[str]) -> list[str]:
    """The base's and each expert's path from the flags and from a recipe file (given as --recipe or
    as an argument ending in .yml or .yaml), the base first; Hub repo ids and missing paths left out."""
    given: dict[str, list[str]] = {flag: [] for flag in VALUE_FLAGS}
    recipes = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in given and eq:
            given[flag].append(value)
        elif arg in given and i + 1 < len(args):
            given[arg].append(args[i + 1])
        elif arg.endswith((".yml", ".yaml")) and (i == 0 or args[i - 1] not in given):
            recipes.append(arg)
    base, experts = given["--base"][-1:], list(given["--expert"])
    for recipe in [r for r in given["--recipe"] + recipes if os.path.isfile(r)]:
        recipe_base, recipe_experts = recipe_inputs(recipe)
        base = base or recipe_base
        experts = experts or recipe_experts
    return [p for p in dict.fromkeys(base + experts) if os.path.exists(p)]


def recipe_inputs(path: str) -> tuple[list[str], list[str]]:
    """(base, experts) named by a recipe file, ours (base, experts) or mergekit's (base_model, models)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        return [], []

    def name(entry) -> str | None:
        if isinstance(entry, dict):
            entry = entry.get("path", entry.get("model"))
        return entry if isinstance(entry, str) else None

    base = name(doc.get("base", doc.get("base_model")))
    entries = doc.get("experts", doc.get("models")) or []
    experts = [n for n in map(name, entries if isinstance(entries, list) else []) if n]
    return ([base] if base else []), experts


def model_files(path: str) -> list[str]:
    """The files a model or adapter folder's weights are in, in the order a merge opens them
    (io/checkpoint.py: an index's files sorted by name); a file stands for itself."""
    if os.path.isfile(path):
        return [path]
    for index in INDEX_FILES:
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, n) for n in names]
    return [os.path.join(path, n) for n in MODEL_FILES if os.path.isfile(os.path.join(path, n))][:1]


def limit() -> int:
    """LIMIT, or a quarter of the memory the system has available where that is less."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(LIMIT, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return LIMIT


def read(inputs: list[list[str]], budget: int) -> int:
    """Read the inputs' files in turn, CHUNK bytes of each input at a time, until `budget` bytes,
    the end of every input, or `stop`; the bytes read."""
    buffer = memoryview(bytearray(CHUNK))
    at = [(0, 0)] * len(inputs)  # per input: (its file, the offset in it)
    fds: dict[str, int] = {}
    done = 0
    try:
        while done < budget and not _stop.is_set():
            progressed = False
            for i, files in enumerate(inputs):
                k, offset = at[i]
                if k >= len(files) or _stop.is_set():
                    continue
                fd = fds.get(files[k])
                if fd is None:
                    fd = fds[files[k]] = os.open(files[k], os.O_RDONLY)
                want = min(CHUNK, budget - done)
                n = os.preadv(fd, [buffer[:want]], offset)
                at[i] = (k + 1, 0) if n < want else (k, offset + n)  # short: the file's end
                done += max(n, 0)
                progressed = True
                if done >= budget:
                    break
            if not progressed:
                break
    except OSError:
        pass  # a hint: the merge reads (and reports) for itself
    finally:
        for fd in fds.values():
            os.close(fd)
    return done
