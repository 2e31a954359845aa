"""Hub repo ids as inputs, against the real client (huggingface_hub) and a Hub on loopback
(tests/fakehub.py) serving the toy models: validated and planned from headers before any weight
byte is served, merged byte-identical to the same local folders, offline from a filled cache with no
request, a killed download resumed, a moved revision refused on resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_toy

pytest.importorskip("huggingface_hub")
sys.path.insert(0, os.path.dirname(__file__))
from fakehub import FakeHub  # noqa: E402

import streammerge  # noqa: E402
from streammerge.io import hub as hub_io  # noqa: E402

TIES = ["--method", "ties", "--density", "0.5"]


@pytest.fixture(scope="module")
def hub(toy_untied, tmp_path_factory):
    """org/base, org/e1, org/e2 (toy_untied, sharded) and org/wrong (another layer count)."""
    server = FakeHub()
    server.add("org/base", f"{toy_untied}/base")
    server.add("org/e1", f"{toy_untied}/expert-1")
    server.add("org/e2", f"{toy_untied}/expert-2")
    other = make_toy(str(tmp_path_factory.mktemp("toy_deep")), "--preset", "tiny", "--layers", "3", "--experts", "1",
                     "--bias", "--shard-size", "60KB")  # fmt: skip
    wrong = str(tmp_path_factory.mktemp("wrong"))
    for f in os.listdir(f"{other}/expert-1"):
        if f != "config.json":  # caught by the tensors' headers, not by config.json
            shutil.copy(f"{other}/expert-1/{f}", wrong)
    server.add("org/wrong", wrong)
    server.start()
    yield server
    server.stop()


def cli(hub: FakeHub, cache: str, *args: str, offline: bool = False, token: str | None = None):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "streammerge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)  # fmt: skip


def shards(folder: str) -> dict[str, bytes]:
    return {
        f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
    }


@pytest.fixture(scope="module")
def local_ties(toy_untied, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("local") / "out")
    recipe = streammerge.Recipe("ties", f"{toy_untied}/base", (f"{toy_untied}/expert-1", f"{toy_untied}/expert-2"),
                                out, {"density": 0.5})  # fmt: skip
    streammerge.merge(recipe)
    return out


@pytest.fixture(scope="module")
def filled_cache(hub, local_ties, tmp_path_factory):
    """A merge of repo ids, after `plan` on them; the cache it filled and its output."""
    cache, out = tmp_path_factory.mktemp("cache"), str(tmp_path_factory.mktemp("hubout") / "out")
    before = hub.weight_bytes
    plan = cli(hub, cache, "plan", *TIES, "--base", "org/base", "--expert", "org/e1@main", "--expert", "org/e2",
               "--no-estimate")  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert hub.weight_bytes == before  # headers only
    n = len(hub.requests)
    merged = cli(hub, cache, "merge", *TIES, "--base", "org/base", "--expert", "org/e1@main", "--expert", "org/e2",
                 "--out", out, "-q", token="hf_test_token")  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    sent = [a for r, a in zip(hub.requests[n:], hub.authorization[n:]) if "/org/" in r[1]]
    assert sent and all(a == "Bearer hf_test_token" for a in sent)  # HF_TOKEN on every request of the merge
    heads = [r[1] for r in hub.requests[n:] if r[0] == "HEAD" and r[1].endswith(".safetensors")]
    assert heads and len(heads) == len(set(heads)), heads  # each file's size and ETag asked once
    return cache, out, plan.stdout


def test_plan_on_repo_ids_downloads_no_weight_and_the_merge_equals_local_folders(filled_cache, local_ties, hub):
    cache, out, plan = filled_cache
    assert "to download: 15 weight file(s)" in plan  # 3 models x 5 shards, none read yet
    assert shards(out) == shards(local_ties)
    card = open(os.path.join(out, "README.md")).read()
    assert "- org/base\n- org/e1\n- org/e2\n" in card  # base_model: repo ids, not cache folders
    journal = json.load(open(os.path.join(out, "streammerge.json")))
    commit = hub.repos["org/e1"].branches["main"]
    assert [f"org/e1@{commit}"] == [r for _, r in journal["recipe"]["origins"] if r.startswith("org/e1@")]
    blobs = os.listdir(os.path.join(cache, "models--org--e1", "blobs"))
    assert blobs and not [b for b in blobs if b.endswith(hub_io.PARTIAL_SUFFIX)]
    with open(os.path.join(cache, "models--org--e1", "refs", "main")) as f:
        assert f.read() == commit  # the standard cache layout: huggingface_hub reads it back
    from huggingface_hub import try_to_load_from_cache

    assert os.path.isfile(try_to_load_from_cache("org/e1", "config.json", cache_dir=str(cache)))


def test_a_mismatched_expert_is_refused_before_any_weight_byte_is_served(hub, tmp_path):
    before = hub.weight_bytes
    r = cli(hub, tmp_path / "cache", "merge", *TIES, "--base", "org/base", "--expert", "org/e1", "--expert",
            "org/wrong", "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert "org/wrong/model-" in r.stderr and "is not in the base" in r.stderr  # named by repo id and file
    assert hub.weight_bytes == before
    assert not os.path.exists(tmp_path / "out")


def test_offline_a_filled_cache_merges_with_no_request(filled_cache, hub, tmp_path):
    cache, out, _ = filled_cache
    recipe = tmp_path / "recipe.yaml"  # a mergekit recipe naming repo ids, revision as mergekit writes it
    recipe.write_text("merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/e1@main\n"
                      "    parameters: {weight: 1.0, density: 0.5}\n  - model: org/e2\n"
                      "    parameters: {weight: 1.0, density: 0.5}\ndtype: float32\n")  # fmt: skip
    n = len(hub.requests)
    r = cli(hub, cache, "merge", str(recipe), str(tmp_path / "out"), "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert len(hub.requests) == n
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")


def test_offline_an_uncached_repo_fails_up_front_naming_it(hub, tmp_path):
    n = len(hub.requests)
    r = cli(hub, tmp_path / "empty", "plan", *TIES, "--base", "org/base", "--expert", "org/e1", offline=True)
    assert r.returncode == 3
    assert "org/base: no such folder, and not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert len(hub.requests) == n


def test_a_mistyped_method_is_refused_before_the_hub_is_asked(hub, tmp_path):
    n = len(hub.requests)
    r = cli(hub, tmp_path / "cache", "plan", "--method", "tiez", "--base", "org/base", "--expert", "org/e1")
    assert r.returncode == 2 and "unknown merge method 'tiez'; did you mean 'ties'?" in r.stderr, r.stderr
    assert len(hub.requests) == n


def test_a_killed_download_resumes_where_it_stopped(hub, local_ties, tmp_path):
    cache, out = tmp_path / "cache", str(tmp_path / "out")
    files = hub.repos["org/e2"].commits[hub.repos["org/e2"].branches["main"]]
    name = max((f for f in files if f.endswith(".safetensors")), key=lambda f: len(files[f]))
    size = len(files[name])
    hub.stall_after[f"org/e2/{name}"] = size // 2  # the first GET of that file sends half of it, then hangs
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1")
    args = ["merge", *TIES, "--base", "org/base", "--expert", "org/e1", "--expert", "org/e2", "--out", out, "-q"]
    p = subprocess.Popen([sys.executable, "-m", "streammerge.cli", *args], cwd=ROOT, env=env)
    blobs = cache / "models--org--e2" / "blobs"
    deadline = time.time() + 120
    part = None
    while time.time() < deadline and p.poll() is None:
        parts = [b for b in os.listdir(blobs) if b.endswith(hub_io.PARTIAL_SUFFIX)] if blobs.is_dir() else []
        if parts and os.path.getsize(blobs / parts[0]) >= size // 4:
            part = blobs / parts[0]
            break
        time.sleep(0.05)
    assert part is not None, "the download did not start"
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = os.path.getsize(part)
    r = cli(hub, cache, *args)
    assert r.returncode == 0, r.stderr
    resumed = [rng for _, path, rng in hub.weight_requests() if path.endswith(f"/{name}") and "/org/e2/" in path
               and rng == f"bytes={kept}-"]  # fmt: skip
    assert resumed, hub.weight_requests()[-6:]
    assert shards(out) == shards(local_ties)


def test_a_resume_never_mixes_two_revisions(filled_cache, hub, toy_untied, tmp_path):
    cache, _, _ = filled_cache
    out = str(tmp_path / "out")
    args = ["merge", *TIES, "--base", "org/base", "--expert", "org/e1", "--expert", "org/e2", "--out", out, "-q"]
    assert cli(hub, cache, *args).returncode == 0
    old = hub.repos["org/e2"].branches["main"]
    new = hub.add("org/e2", f"{toy_untied}/expert-3")  # main moves to a new commit
    try:
        r = cli(hub, cache, *args)
    finally:
        hub.repos["org/e2"].branches["main"] = old
    assert r.returncode == 5, r.stderr
    assert f"org/e2: is now at commit {new[:12]}, the merge in {out} was started from commit {old[:12]}" in r.stderr


def test_without_huggingface_hub_a_repo_id_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['huggingface_hub'] = None; from streammerge.cli import main; "
            "main(['plan', '--method', 'linear', '--base', 'org/base', '--expert', 'org/e1'])")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "pip install 'streammerge[hub]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_local_folder_wins_over_a_repo_id_of_the_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_io.is_repo_id("org/model") and hub_io.is_repo_id("org/model@v2")
    os.makedirs("org/model")
    assert not hub_io.is_repo_id("org/model")
    assert not hub_io.is_repo_id("./org/model") and not hub_io.is_repo_id("/abs/path")


def test_a_peft_adapter_on_the_hub_merges_like_its_local_folder(hub, tmp_path_factory, tmp_path):
    toy = make_toy(str(tmp_path_factory.mktemp("toy_lora")), "--preset", "tiny", "--kind", "lora", "--experts", "1")
    hub.add("org/lbase", f"{toy}/base")
    hub.add("org/lora", f"{toy}/expert-1")
    local = str(tmp_path / "local")
    streammerge.merge(streammerge.Recipe("task_arithmetic", f"{toy}/base", (f"{toy}/expert-1",), local))
    before = hub.weight_bytes
    r = cli(hub, tmp_path / "cache", "plan", "--method", "task_arithmetic", "--base", "org/lbase", "--expert",
            "org/lora", "--no-estimate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert hub.weight_bytes == before and "to download: 2 weight file(s)" in r.stdout
    r = cli(hub, tmp_path / "cache", "merge", "--method", "task_arithmetic", "--base", "org/lbase", "--expert",
            "org/lora", "--out", str(tmp_path / "out"), "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert shards(str(tmp_path / "out")) == shards(local)


def test_a_bin_checkpoint_on_the_hub_is_downloaded_before_its_checks_and_merges_like_local(
    hub, toy_untied, local_ties, tmp_path
):
    """A .bin keeps its tensor table at its end: downloaded first (said so), then merged the same."""
    from test_torch_bin import as_bin

    hub.add("org/e2-bin", as_bin(f"{toy_untied}/expert-2", str(tmp_path / "e2bin"), shards=2))
    before = hub.weight_bytes
    r = cli(hub, tmp_path / "cache", "plan", *TIES, "--base", "org/base", "--expert", "org/e1", "--expert",
            "org/e2-bin", "--no-estimate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "a .bin checkpoint is read whole to be checked: downloading it first" in r.stderr
    assert hub.weight_bytes > before  # the .bin files, and only them: the others' headers
    assert "to download: 10 weight file(s)" in r.stdout
    out = str(tmp_path / "out")
    r = cli(hub, tmp_path / "cache", "merge", *TIES, "--base", "org/base", "--expert", "org/e1", "--expert",
            "org/e2-bin", "--out", out, "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(local_ties)


def test_an_unreachable_hub_falls_back_to_the_cache_or_says_so(filled_cache, tmp_path):
    cache, _, _ = filled_cache
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")  # nothing listens there
    env.pop("HF_HUB_OFFLINE", None)
    args = [sys.executable, "-m", "streammerge.cli", "plan", *TIES, "--base", "org/base", "--expert", "org/e1",
            "--no-estimate"]  # fmt: skip
    r = subprocess.run(args, cwd=ROOT, env=env | {"HF_HUB_CACHE": str(cache)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "org/base: the Hub cannot be reached (ConnectError); using the cache" in r.stderr
    r = subprocess.run(args, cwd=ROOT, env=env | {"HF_HUB_CACHE": str(tmp_path)}, capture_output=True, text=True)
    assert r.returncode == 3 and "org/e1: no such folder, and not in the Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr
