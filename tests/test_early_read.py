"""early_read.py: which files `streammerge merge` starts reading while torch is imported, in what
order, how much, and that it stops when the merge's own reads start."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from streammerge import early_read
from streammerge.prefetch import PageCache
from tests.conftest import evict, experts_of


def model(folder, files: dict[str, int]) -> str:
    """A model folder whose index names `files` (name -> size in bytes), written."""
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, (name, size) in enumerate(files.items()):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(bytes([i + 1]) * size)
        weight_map[f"t{i}"] = name
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return str(folder)


def test_the_inputs_are_taken_from_the_flags_and_from_recipes_the_base_first(tmp_path):
    base, e1, e2 = (str(tmp_path / n) for n in ("base", "e1", "e2"))
    for p in (base, e1, e2):
        os.makedirs(p)
    args = ["--expert", e1, "--method", "ties", f"--expert={e2}", "--base", base, "--out", str(tmp_path / "o")]
    assert early_read.input_paths(args) == [base, e1, e2]
    # a Hub repo id and a missing folder are left out (the command reports the missing one)
    assert early_read.input_paths(["--base", "org/name", "--expert", e1, "--expert", str(tmp_path / "nil")]) == [e1]
    ours = tmp_path / "ours.yaml"
    ours.write_text(f"method: ties\nbase: {base}\nexperts:\n  - {e1}\n  - {{path: {e2}, weight: 0.5}}\n")
    assert early_read.input_paths(["--recipe", str(ours)]) == [base, e1, e2]
    mergekit = tmp_path / "mk.yml"
    mergekit.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e2}\n  - model: {base}\n")
    # mergekit's argument order, `merge RECIPE OUT`; the base once, though the recipe lists it again
    assert early_read.input_paths([str(mergekit), str(tmp_path / "o")]) == [base, e2]
    # flags beside a recipe override it, as the command does
    assert early_read.input_paths(["--recipe", str(ours), "--expert", e2]) == [base, e2]
    assert early_read.input_paths(["--recipe", str(tmp_path / "absent.yaml")]) == []  # the command says why


def test_a_folder_s_files_are_those_its_index_names_sorted_as_a_merge_opens_them(tmp_path):
    folder = model(tmp_path / "m", {"b-00002.safetensors": 10, "b-00001.safetensors": 10})
    assert early_read.model_files(folder) == [os.path.join(folder, f"b-0000{i}.safetensors") for i in (1, 2)]
    single = tmp_path / "single"
    single.mkdir()
    (single / "pytorch_model.bin").write_bytes(b"x")
    assert early_read.model_files(str(single)) == [str(single / "pytorch_model.bin")]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert early_read.model_files(str(adapter)) == [str(adapter / "adapter_model.safetensors")]
    assert early_read.model_files(str(adapter / "adapter_model.safetensors")) == [str(adapter / "adapter_model.safetensors")]


def test_inputs_are_read_in_turn_chunk_by_chunk_up_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(early_read, "CHUNK", 100)
    base = model(tmp_path / "base", {"1.safetensors": 250, "2.safetensors": 100})
    expert = model(tmp_path / "expert", {"1.safetensors": 150})
    files = [early_read.model_files(base), early_read.model_files(expert)]
    reads = []
    real = os.preadv

    def preadv(fd, buffers, offset):
        n = real(fd, buffers, offset)
        reads.append((os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd, offset, n))
        return n

    monkeypatch.setattr(early_read.os, "preadv", preadv)
    early_read._stop.clear()
    assert early_read.read(files, 10_000) == 500
    if os.path.exists("/proc/self/fd"):
        b1, b2, e1 = files[0][0], files[0][1], files[1][0]
        # a read short of the chunk, or of nothing, ends a file (here b2's second: it is 100 bytes)
        assert [(p, o) for p, o, _ in reads] == [(b1, 0), (e1, 0), (b1, 100), (e1, 100), (b1, 200), (b2, 0), (b2, 100)]
    reads.clear()
    assert early_read.read(files, 230) == 230  # the budget, whatever the chunks
    early_read.stop()
    try:
        assert early_read.read(files, 10_000) == 0  # stopped: nothing more is read
    finally:
        early_read._stop.clear()


def test_only_a_local_merge_starts_the_thread():
    assert early_read.start(["plan", "--base", "."]) is None
    assert early_read.start(["merge", "--base", ".", "--ray", "auto"]) is None
    assert early_read.start(["merge", "--base", "org/name"]) is None  # nothing local to read


def test_the_thread_puts_the_inputs_first_bytes_in_the_page_cache(tmp_path):
    size = 6 * 4096
    base = model(tmp_path / "base", {"model-1.safetensors": size})
    expert = model(tmp_path / "expert", {"model-1.safetensors": size})
    paths = [os.path.join(f, "model-1.safetensors") for f in (base, expert)]
    if not evict(*paths):
        pytest.skip("the page cache cannot be emptied here (tmpfs, or no posix_fadvise)")
    thread = early_read.start(["merge", "--base", base, "--expert", expert, "--out", str(tmp_path / "out")])
    assert thread is not None
    thread.join(30)
    cache = PageCache()
    try:
        assert all(cache.holds(p, 0, size) for p in paths)
    finally:
        cache.close()


def test_the_command_merges_the_same_bytes_with_its_inputs_read_early(toy_untied, tmp_path):
    """The installed command (console.py starts the reading) against the same merge run in-process."""
    from click.testing import CliRunner

    from streammerge.cli import main

    toy = toy_untied
    args = ["merge", "--base", os.path.join(toy, "base"), "--method", "task_arithmetic", "--quiet"]
    for e in experts_of(toy, 2):
        args += ["--expert", e]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "in-process")])
    assert result.exit_code == 0, result.output
    evict(*(os.path.join(d, f) for d in [os.path.join(toy, "base"), *experts_of(toy, 2)] for f in os.listdir(d)))
    run = subprocess.run([sys.executable, "-c", "from streammerge.console import entry; entry()", *args, "--out",
                          str(tmp_path / "command")], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr

    def digest(folder):
        return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
                for f in os.listdir(folder) if f.endswith(".safetensors")}  # fmt: skip

    assert digest(tmp_path / "command") == digest(tmp_path / "in-process") != {}


def test_no_import_beyond_the_standard_library_and_yaml():
    code = "import sys, streammerge.early_read; print(sorted(m for m in ('torch', 'numpy', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

