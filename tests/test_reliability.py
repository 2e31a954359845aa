"""Every bad input and fault ends in a clear error, the right exit code, and nothing half-written.

Each case in CASES builds one bad input, runs `streammerge merge`, and checks the exit code, a
fragment of the one-line message (naming the file and tensor where there is one), and that no
shard or index appeared under a final name. tests/FAULTS.md is the table of these cases (plus
the faults tested elsewhere); `test_faults_table_matches_the_tests` keeps the two in step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from streammerge.cli import main
from tests.conftest import ROOT, experts_of


def raw(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: str, header: dict | bytes, body: bytes, length: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length) + blob + body)


def shard_of(folder: str, tensor: str) -> str:
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    return os.path.join(folder, index["weight_map"][tensor])


def edit_header(folder: str, tensor: str, edit) -> None:
    path = shard_of(folder, tensor)
    header, body = raw(path)
    edit(header)
    write_raw(path, header, body)


def edit_index(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    edit(index)
    json.dump(index, open(path, "w"))


Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.post_attention_layernorm.weight"


class Case:
    def __init__(self, toy: str, tmp: str):
        self.toy, self.tmp = toy, tmp
        self.base = os.path.join(toy, "base")
        self.experts = experts_of(toy)[:2]
        self.out = os.path.join(tmp, "out")
        self.extra: list[str] = []
        self.method = "ties"

    def copy(self, which: str) -> str:
        dst = os.path.join(self.tmp, os.path.basename(which) + "-copy")
        shutil.copytree(which, dst)
        return dst

    def bad_expert(self) -> str:
        self.experts[0] = self.copy(self.experts[0])
        return self.experts[0]

    def bad_base(self) -> str:
        self.base = self.copy(self.base)
        return self.base

    def args(self) -> list[str]:
        a = ["merge", "--quiet", "--device", "cpu", "--base", self.base]
        for e in self.experts:
            a += ["--expert", e]
        return a + ["--method", self.method, "--out", self.out, *self.extra]


def missing_and_shape_together(c: Case):
    e = c.bad_expert()
    edit_header(e, NORM, lambda h: h.pop(NORM))
    edit_index(e, lambda i: i["weight_map"].pop(NORM))
    second = c.copy(c.experts[1])
    c.experts[1] = second
    edit_header(second, Q, lambda h: h[Q].update(shape=[32, 128]))
    return 3, [f"tensor {NORM!r} is missing", f"tensor {Q!r} has shape [32, 128], the base [64, 64]"]


def extra_tensor(c: Case):
    e = c.bad_expert()
    path = shard_of(e, Q)
    header, body = raw(path)
    header["extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
    write_raw(path, header, body + bytes(8))
    edit_index(e, lambda i: i["weight_map"].update({"extra.weight": os.path.basename(path)}))
    return 3, ["tensor 'extra.weight' is not in the base"]


def uncastable_dtype(c: Case):
    edit_header(c.bad_expert(), Q, lambda h: h[Q].update(dtype="I16"))  # same byte size as BF16
    return 3, [f"tensor {Q!r} has dtype I16, not castable to the base's BF16"]


def lora_target_absent(c: Case):
    d = os.path.join(c.tmp, "lora")
    os.makedirs(d)
    save_file(
        {
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
        },
        os.path.join(d, "adapter_model.safetensors"),
    )
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, open(os.path.join(d, "adapter_config.json"), "w"))
    c.experts[0] = d
    return 3, ["targets 'model.layers.7.self_attn.q_proj', which the base has no"]


def pickled_adapter(c: Case):
    d = os.path.join(c.tmp, "bin")
    os.makedirs(d)
    open(os.path.join(d, "adapter_model.bin"), "wb").write(b"\x80\x04")
    json.dump({"peft_type": "LORA"}, open(os.path.join(d, "adapter_config.json"), "w"))
    c.experts[0] = d
    return 3, ["adapter_model.bin: not a zip archive (the pre-1.6 torch.save format, or not a checkpoint)"]


def no_experts(c: Case):
    c.experts = []
    return 2, ["at least one expert is needed"]


def unknown_method(c: Case):
    c.method = "tiez"
    return 2, ["unknown merge method 'tiez'; did you mean 'ties'? (known: "]


def density_zero(c: Case):
    c.extra = ["--density", "0"]
    return 2, ["density = 0.0 is outside (0.0, 1.0]"]


def nonfinite_lambda(c: Case):
    c.extra = ["--lambda", "inf"]  # a negative λ is allowed: task negation, as in mergekit
    return 2, ["lambda = inf is not finite"]


def drop_rate_one(c: Case):
    c.method, c.extra = "dare", ["--drop-rate", "1"]
    return 2, ["drop_rate = 1.0 is outside [0.0, 1.0)"]


def unknown_parameter(c: Case):
    c.extra = ["--param", "denisty=0.3"]
    return 2, ["unknown parameter(s) denisty; did you mean 'density'? (known: "]


def bad_residual_method(c: Case):
    c.method, c.extra = "orthomerge", ["--residual-method", "nope"]
    return 2, ["unknown merge method 'nope' (known: "]  # nothing close: no guess


def out_is_input(c: Case):
    c.out = c.experts[0]
    return 2, [f"output folder {c.out} is (inside) input folder"]


def out_inside_input(c: Case):
    c.out = os.path.join(c.base, "merged")
    return 2, ["is (inside) input folder"]


def out_holds_other_files(c: Case):
    os.makedirs(c.out)
    open(os.path.join(c.out, "notes.txt"), "w").write("mine")
    return 5, ["not empty and not a streammerge output ('notes.txt'"]


def out_unwritable(c: Case):
    open(os.path.join(c.tmp, "a-file"), "w").write("x")
    c.out = os.path.join(c.tmp, "a-file", "out")
    return 4, ["a-file/out: cannot write"]


def bad_yaml(c: Case):
    path = os.path.join(c.tmp, "r.yaml")
    open(path, "w").write("method: [ties\n")
    c.recipe = path
    return 2, ["not valid YAML"]


def truncated_shard(c: Case):
    e = c.bad_expert()
    path = shard_of(e, Q)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    return 3, [f"{os.path.basename(path)}: tensor", "past the end of the file's data", "truncated?"]


def header_not_json(c: Case):
    path = shard_of(c.bad_expert(), Q)
    _, body = raw(path)
    write_raw(path, b"{not json" + b" " * 7, body)
    return 3, ["header is not valid JSON"]


def header_too_large(c: Case):
    path = shard_of(c.bad_expert(), Q)
    header, body = raw(path)
    write_raw(path, header, body, length=2**40)
    return 3, ["header length 1099511627776 exceeds"]


def offsets_past_end(c: Case):
    edit_header(c.bad_expert(), Q, lambda h: h[Q].update(data_offsets=[10**9, 10**9 + 8192]))
    return 3, [f"tensor {Q!r}: data ends at", "past the end"]


def offsets_overlap(c: Case):
    def overlap(h):
        names = [k for k in h if k != "__metadata__"]
        other = next(k for k in names if k != Q and h[k]["data_offsets"][1] - h[k]["data_offsets"][0] >= 8192)
        h[Q]["data_offsets"] = list(h[other]["data_offsets"][:1]) + [h[other]["data_offsets"][0] + 8192]

    edit_header(c.bad_expert(), Q, overlap)
    return 3, ["overlap"]


def index_missing_shard(c: Case):
    e = c.bad_expert()
    os.remove(shard_of(e, NORM))
    return 3, ["which is missing"]


def index_duplicate_key(c: Case):
    e = c.bad_expert()
    path = os.path.join(e, "model.safetensors.index.json")
    text = open(path).read().replace('"weight_map": {', f'"weight_map": {{"{Q}": "x.safetensors", ', 1)
    open(path, "w").write(text)
    return 3, [f"key {Q!r} appears more than once"]


def tensor_in_two_shards(c: Case):
    e = c.bad_expert()
    index = json.load(open(os.path.join(e, "model.safetensors.index.json")))
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][Q])
    header, body = raw(os.path.join(e, other))
    header[Q] = {"dtype": "BF16", "shape": [64, 64], "data_offsets": [len(body), len(body) + 8192]}
    write_raw(os.path.join(e, other), header, body + bytes(8192))
    return 3, [f"tensor {Q!r} also in"]


def config_not_json(c: Case):
    base = c.bad_base()
    open(os.path.join(base, "config.json"), "w").write("{oops")
    return 3, ["config.json: not valid JSON"]


def nan_in_expert(c: Case):
    e = c.bad_expert()
    path = shard_of(e, NORM)
    header, body = raw(path)
    start = header[NORM]["data_offsets"][0]
    body = (
        body[:start]
        + torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
        + body[start + 2 :]
    )
    write_raw(path, header, body)
    return 3, [f"tensor {NORM!r} contains NaN or Inf (pass --allow-nonfinite"]


CASES = {
    f.__name__: f
    for f in (
        missing_and_shape_together,
        extra_tensor,
        uncastable_dtype,
        lora_target_absent,
        pickled_adapter,
        no_experts,
        unknown_method,
        density_zero,
        nonfinite_lambda,
        drop_rate_one,
        unknown_parameter,
        bad_residual_method,
        out_is_input,
        out_inside_input,
        out_holds_other_files,
        out_unwritable,
        bad_yaml,
        truncated_shard,
        header_not_json,
        header_too_large,
        offsets_past_end,
        offsets_overlap,
        index_missing_shard,
        index_duplicate_key,
        tensor_in_two_shards,
        config_not_json,
        nan_in_expert,
    )
}


def final_outputs(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return [f for f in os.listdir(out) if f.startswith("model") and not f.endswith(".streammerge-tmp")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error(case, toy_untied, tmp_path):
    c = Case(toy_untied, str(tmp_path))
    c.recipe = None
    code, fragments = CASES[case](c)
    args = c.args() if c.recipe is None else ["merge", "--recipe", c.recipe, "--out", c.out]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    err = result.output
    assert result.exit_code == code, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert final_outputs(c.out) == [] or case in ("out_is_input",)


def test_nan_merges_when_allowed(toy_untied, tmp_path):
    c = Case(toy_untied, str(tmp_path))
    nan_in_expert(c)
    c.extra = ["--allow-nonfinite"]
    c.method = "task_arithmetic"
    assert CliRunner().invoke(main, c.args(), catch_exceptions=False).exit_code == 0


# --- faults during a merge -----------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streammerge.cli", "merge", "--quiet", "--device", "cpu", *args]


def merge_args(folder: str, out: str) -> list[str]:
    a = ["--base", os.path.join(folder, "base")]
    for e in experts_of(folder):
        a += ["--expert", e]
    return a + ["--method", "ties", "--out", out, "--shard-size", "30KB"]


def same_files(a: str, b: str) -> None:
    names = sorted(f for f in os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n


def mount_tmpfs(path, size: int) -> bool:
    path.mkdir(exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_too_small_for_the_output_is_refused_up_front(toy_untied, tmp_path):
    mnt = tmp_path / "small"
    if not mount_tmpfs(mnt, 160 * 1024):
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = subprocess.run(cli(*merge_args(toy_untied, str(mnt / "out"))), capture_output=True, text=True)
        assert r.returncode == 4 and "more disk space" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not [f for f in os.listdir(mnt / "out") if f.startswith("model")]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_disk_full_on_a_small_filesystem_then_resume(toy_untied, tmp_path):
    reference = str(tmp_path / "reference")
    subprocess.run(cli(*merge_args(toy_untied, reference)), check=True)
    needed = sum(os.path.getsize(os.path.join(reference, f)) for f in os.listdir(reference) if f.startswith("model-"))
    # room for the shards' bytes beside the journal (the up-front check passes; the journal, which
    # names every input file, is 2-3 pages as the paths are long), but not once every file is rounded
    # up to whole pages: ENOSPC arrives mid-merge
    journal = os.path.getsize(os.path.join(reference, "streammerge.json"))
    mnt = tmp_path / "small"
    if not mount_tmpfs(mnt, (-(-needed // 4096) + -(-journal // 4096) + 1) * 4096):
        pytest.skip("cannot mount a tmpfs here; the injected-ENOSPC test covers the logic")
    try:
        out = str(mnt / "out")
        r = subprocess.run(cli(*merge_args(toy_untied, out)), capture_output=True, text=True)
        assert r.returncode == 4, r.stderr
        assert "no space left on the device" in r.stderr and r.stderr.count("\n") == 1
        done = [f for f in os.listdir(out) if f.startswith("model-")]
        assert done, "some shards should have fitted"
        for f in done:  # every shard under a final name is complete
            assert open(os.path.join(out, f), "rb").read() == open(os.path.join(reference, f), "rb").read()
        assert not [f for f in os.listdir(out) if f.endswith(".streammerge-tmp")]  # freed again
        subprocess.run(["mount", "-o", "remount,size=2m", str(mnt)], check=True)
        r = subprocess.run(cli(*merge_args(toy_untied, out)), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        same_files(out, reference)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_injected_enospc_leaves_no_partial_file(toy_untied, tmp_path, monkeypatch):
    import errno

    from streammerge.errors import ResourceError
    from streammerge.io import atomic
    from streammerge.engine import Merge, RunOptions
    from streammerge.recipe import Expert, Recipe

    calls = {"n": 0}
    real_write = atomic.ShardWriter._write

    def failing_write(self, data):  # the header's and each tensor's bytes, on the writer's thread
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(atomic.ShardWriter, "_write", failing_write)
    recipe = Recipe(
        "ties",
        os.path.join(toy_untied, "base"),
        tuple(Expert(e) for e in experts_of(toy_untied)),
        str(tmp_path / "out"),
        shard_size="30KB",
    )
    m = Merge(recipe, RunOptions(device="cpu", quiet=True))
    with pytest.raises(ResourceError, match="no space left"):
        m.run()
    m.close()
    names = os.listdir(tmp_path / "out")
    assert not [n for n in names if n.endswith(".streammerge-tmp")]
    journal = json.load(open(tmp_path / "out" / "streammerge.json"))
    assert sorted(n for n in names if n.startswith("model-")) == sorted(journal["finished"])


def test_input_changed_during_merge_is_detected(toy_untied, tmp_path, monkeypatch):
    from streammerge.errors import InputError
    from streammerge.io import atomic
    from streammerge.recipe import Expert, Recipe
    from streammerge.engine import Merge, RunOptions

    expert = shutil.copytree(experts_of(toy_untied)[0], str(tmp_path / "e1"))
    real_commit = atomic.ShardWriter.commit

    def commit_then_touch(self):
        result = real_commit(self)
        victim = shard_of(expert, NORM)
        os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
        return result

    monkeypatch.setattr(atomic.ShardWriter, "commit", commit_then_touch)
    recipe = Recipe(
        "ties",
        os.path.join(toy_untied, "base"),
        (Expert(expert), Expert(experts_of(toy_untied)[1])),
        str(tmp_path / "out"),
        shard_size="30KB",
    )
    m = Merge(recipe, RunOptions(device="cpu", quiet=True))
    with pytest.raises(InputError, match="changed during the merge"):
        m.run()
    m.close()


@pytest.mark.parametrize("sig,name", [(2, "SIGINT"), (15, "SIGTERM")], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_exit_130_resumable(sig, name, tmp_path):
    from tests.conftest import make_toy

    folder = make_toy(
        str(tmp_path / "m"), "--preset", "small", "--layers", "16", "--experts", "3", "--shard-size", "1MB"
    )
    args = merge_args(folder, str(tmp_path / "out"))
    args[args.index("--shard-size") + 1] = "300KB"
    args += ["--ties-scope", "model"]
    journal = tmp_path / "out" / "streammerge.json"
    for delay in (0.3, 0.1, 0.6, 0.05, 1.0, 0.02, 0.0, 0.0):
        proc = subprocess.Popen(cli(*args), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # signal the merge, not the interpreter's start-up imports
        time.sleep(delay)
        if proc.poll() is not None:
            shutil.rmtree(tmp_path / "out")
            continue
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0 and "interrupted" not in err:  # it finished between poll() and the signal
            shutil.rmtree(tmp_path / "out")
            continue
        assert proc.returncode == 130, err
        assert "rerun the same command to resume" in err or "nothing was written" in err
        break
    else:
        pytest.skip("the merge always finished before the signal")
    out = str(tmp_path / "out")
    if os.path.isdir(out):  # at most the temporary file of the shard in progress, journalled as such
        temps = [f for f in os.listdir(out) if f.endswith(".streammerge-tmp")]
        partial = json.load(open(os.path.join(out, "streammerge.json"))).get("partial")
        assert len(temps) <= 1
        assert not temps or not partial or temps[0] == f".{partial['shard']}.streammerge-tmp"
    subprocess.run(cli(*args), check=True)
    reference = str(tmp_path / "reference")
    args[args.index("--out") + 1] = reference
    subprocess.run(cli(*args), check=True)
    same_files(out, reference)


def test_faults_table_matches_the_tests():
    """tests/FAULTS.md lists every case above and every test it names exists."""
    table = open(os.path.join(ROOT, "tests", "FAULTS.md")).read()
    rows = [
        r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| #") and not r.startswith("|---")
    ]
    assert len(rows) >= 25
    names = set()
    for row in rows:
        test = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[(\w+)\])?`", row)
        assert test, row
        path, func, param = test[0]
        source = open(os.path.join(ROOT, path)).read()
        assert f"def {func}(" in source, row
        if func == "test_bad_input_gives_one_clear_error":
            names.add(param)
            assert param in CASES, row
    assert set(CASES) <= names, set(CASES) - names


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "orthomerge"])
def test_nan_in_an_expert_is_named_by_every_method(method, toy_untied, tmp_path):
    """Row-local methods check their results and look for the culprit only then: the error is
    the same as where every input is checked as it is loaded."""
    c = Case(toy_untied, str(tmp_path))
    code, fragments = nan_in_expert(c)
    c.method = method
    result = CliRunner().invoke(main, c.args(), catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and "expert" in result.output and fragments[0] in result.output, (
        result.output
    )
    assert final_outputs(c.out) == []


def test_ctrl_c_while_the_command_starts_is_one_line_and_130():
    """Ctrl-C during the command's imports (a second or more, torch): the entry point answers it
    as it answers one later, not with a traceback. The import is made to raise it."""
    code = (
        "import sys, types\n"
        "cli = types.ModuleType('streammerge.cli')\n"
        "def stop(name):\n"
        "    raise KeyboardInterrupt\n"
        "cli.__getattr__ = stop\n"
        "sys.modules['streammerge.cli'] = cli\n"
        "from streammerge.console import entry\n"
        "entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 130, done
    assert "Traceback" not in done.stderr and "interrupted while starting" in done.stderr, done.stderr
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, streammerge; print(sorted(sys.modules))"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    ).stdout  # fmt: skip


def test_the_command_starts_with_the_collector_on_and_the_imports_frozen():
    """console.entry keeps Python's cyclic collector off while torch is imported and then freezes
    what the imports made (the collector no longer walks them), and it is on again for the merge."""
    code = (
        "import atexit, gc, sys\n"
        "from streammerge.console import entry\n"
        "atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count()))\n"
        "sys.argv = ['streammerge', '--help']\n"
        "entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    enabled, frozen = done.stdout.split()[-2:]
    assert done.returncode == 0 and enabled == "True" and int(frozen) > 100_000, done


def test_toy_models_made_in_parallel_have_the_same_bytes(tmp_path):
    """tools/make_toy_models.py --jobs: each folder depends on the seed alone (bench/slice_gpu.py
    makes its 17.8 GB inputs this way)."""
    from tests.conftest import toy

    sums = []
    for jobs in (1, 3):
        out = tmp_path / f"j{jobs}"
        assert toy.main([str(out), "--experts", "2", "--shared", "0.5", "--jobs", str(jobs)]) == 0
        files = sorted(p for p in out.rglob("*") if p.is_file())
        sums.append([(str(p.relative_to(out)), p.read_bytes()) for p in files])
    assert sums[0] == sums[1] and len(sums[0]) > 4
