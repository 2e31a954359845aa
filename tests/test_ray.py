"""The same merge on a Ray cluster (streammerge/engine/ray.py), all on this machine.

A head (no CPUs, so it runs no task) and two worker nodes of one CPU each, started by the test
with Ray's own test cluster and torn down at the end. They listen on this machine's own address:
Ray replaces 127.0.0.1 in a cluster address by it, so a cluster bound to loopback only cannot be
joined; nothing leaves the machine either way. Every merge below is compared byte for byte
with the local merge of the same command.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import experts_of, make_toy

ray = pytest.importorskip("ray", reason="Ray is a test extra: pip install -e '.[test]'")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow
NODE_MEMORY = 2 * 1024**3


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, memory=NODE_MEMORY)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    return make_toy(
        str(tmp_path_factory.mktemp("ray_models")),
        "--preset",
        "small",
        "--layers",
        "4",
        "--experts",
        "3",
        "--shared",
        "0.7",
        "--shard-size",
        "1MB",
    )


def cli(folder: str, out: str, method: str, *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "streammerge.cli",
        "merge",
        "--quiet",
        "--device",
        "cpu",
        "--base",
        os.path.join(folder, "base"),
    ]
    for e in experts_of(folder):
        cmd += ["--expert", e]
    return cmd + ["--method", method, "--out", out, "--shard-size", "600KB", *extra]


def output_files(out: str) -> list[str]:
    return sorted(f for f in os.listdir(out) if not f.startswith("."))


def assert_same_output(out: str, reference: str) -> None:
    assert output_files(out) == output_files(reference)
    for f in output_files(reference):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(reference, f), shallow=False), (
            f"{f} differs from the local merge"
        )


def shards(out: str) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.startswith("model-") and f.endswith(".safetensors"))


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ties", ()),
        ("ties", ("--ties-scope", "model")),  # the driver's statistics pass, shipped to every task
        ("dare", ("--param", "combine=ties", "--seed", "5")),
        ("orthomerge", ()),
        ("orthomerge", ("--target", "global", "--residual-method", "ties")),
    ],
    ids=["ties", "ties-model", "dare-ties", "orthomerge-c", "orthomerge-g-ties"],
)
def test_ray_merge_is_byte_identical_to_local(cluster, models, tmp_path, method, extra):
    reference, out = str(tmp_path / "local"), str(tmp_path / "ray")
    subprocess.run(cli(models, reference, method, *extra), check=True)
    assert len(shards(reference)) >= 4
    subprocess.run(cli(models, out, method, *extra, "--ray", cluster.address), check=True)
    assert_same_output(out, reference)


def test_ray_local_starts_a_private_instance(models, tmp_path):
    reference, out = str(tmp_path / "local"), str(tmp_path / "ray")
    subprocess.run(cli(models, reference, "task_arithmetic"), check=True)
    subprocess.run(cli(models, out, "task_arithmetic", "--ray", "local"), check=True)
    assert_same_output(out, reference)


def test_worker_killed_mid_shard_is_retried_byte_identical(cluster, models, tmp_path):
    """SIGKILL the worker writing a shard (its temporary file names its pid): Ray retries the task,
    which writes the shard from its start."""
    reference, out = str(tmp_path / "local"), str(tmp_path / "ray")
    args = ("--target", "global", "--shard-size", "5GB")  # one shard, seconds of linear algebra
    subprocess.run(cli(models, reference, "orthomerge", *args), check=True)
    driver = subprocess.Popen(cli(models, out, "orthomerge", *args, "--ray", cluster.address))
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        for f in os.listdir(out) if os.path.isdir(out) else []:
            m = re.search(r"\.ray-(\d+)-[0-9a-f]+\.streammerge-tmp$", f)
            if m and os.path.getsize(os.path.join(out, f)) > 0:
                killed = int(m.group(1))
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    assert driver.wait(timeout=300) == 0
    assert killed is not None, "the shard finished before a worker could be killed in it"
    assert_same_output(out, reference)
    assert not [f for f in os.listdir(out) if f.endswith(".streammerge-tmp")], (
        "the killed attempt's temporary file was left behind"
    )


def test_driver_killed_then_rerun_keeps_finished_shards(cluster, models, tmp_path):
    reference, out = str(tmp_path / "local"), str(tmp_path / "ray")
    subprocess.run(cli(models, reference, "orthomerge"), check=True)
    driver = subprocess.Popen(cli(models, out, "orthomerge", "--ray", cluster.address))
    record = os.path.join(out, "streammerge.json")
    finished: dict = {}
    deadline = time.monotonic() + 120
    while not finished and driver.poll() is None and time.monotonic() < deadline:
        try:
            finished = json.load(open(record))["finished"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert driver.poll() is None, "the merge ended before the driver could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = json.load(open(record))["finished"]
    assert 0 < len(finished) < len(shards(reference))
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in finished}
    subprocess.run(cli(models, out, "orthomerge", "--ray", cluster.address), check=True)
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in finished} == mtimes, (
        "a finished shard was merged again"
    )
    assert_same_output(out, reference)


def test_a_task_no_node_can_run_is_refused_up_front(cluster, models, tmp_path):
    out = str(tmp_path / "ray")
    r = subprocess.run(
        cli(models, out, "ties", "--ray", cluster.address, "--threads", "4"), capture_output=True, text=True
    )
    assert r.returncode == 4, r.stderr  # ResourceError, as a local plan that does not fit
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --ray") and "4 CPU(s)" in line and "largest node offers" in line, r.stderr
    assert not shards(out)


def test_memory_no_node_offers_is_refused(models, tmp_path, monkeypatch):
    """The check against the cluster's nodes, with the nodes' resources as Ray reports them."""
    from streammerge.errors import ResourceError
    from streammerge.recipe import Expert, Recipe
    from streammerge.engine import Merge, RunOptions

    recipe = Recipe(
        "ties", os.path.join(models, "base"), tuple(Expert(e) for e in experts_of(models)), str(tmp_path / "out")
    )
    merger = Merge(recipe, RunOptions(device="cpu", quiet=True, ray="auto"))
    try:
        executor = merger.executor()
        need = max(executor.needs(s)["memory"] for s in merger.shards)
        monkeypatch.setattr(
            ray,
            "nodes",
            lambda: [
                {"Alive": True, "Resources": {"CPU": 8.0, "memory": float(need - 1)}},
                {"Alive": False, "Resources": {"CPU": 8.0, "memory": float(need * 10)}},
            ],
        )
        with pytest.raises(ResourceError, match="needs .* of memory"):
            executor.check_resources(merger.shards)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 1.0, "memory": float(need)}}])
        executor.check_resources(merger.shards)
    finally:
        merger.close()


def test_without_ray_the_option_says_how_to_get_it(models, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; from streammerge.cli import main; "
        f"main(['merge', '--base', {os.path.join(models, 'base')!r}, '--expert', {experts_of(models)[0]!r}, "
        f"'--method', 'task_arithmetic', '--out', {str(tmp_path / 'out')!r}, '--ray', 'local'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --ray needs Ray: pip install -e '.[ray]' in the clone"
    assert not os.path.exists(tmp_path / "out")


def test_ray_in_a_recipe_is_not_part_of_the_result(tmp_path):
    """`ray:` in a recipe selects where the merge runs; the fingerprint (what a resume must match)
    leaves it out, so a merge started locally resumes on Ray and the other way round."""
    from streammerge.recipe_files import read_recipe_file

    path = tmp_path / "r.yaml"
    path.write_text("method: task_arithmetic\nbase: b\nexperts: [e1, e2]\nout: o\nray: auto\n")
    on_ray, run = read_recipe_file(str(path))
    assert run["ray"] == "auto"
    path.write_text("method: task_arithmetic\nbase: b\nexperts: [e1, e2]\nout: o\n")
    local, run = read_recipe_file(str(path))
    assert run.get("ray") is None and on_ray.fingerprint_doc() == local.fingerprint_doc()


def test_report_with_ray_is_refused_before_anything_is_written(models, tmp_path):
    from streammerge.errors import UsageError
    from streammerge.recipe import Expert, Recipe
    from streammerge.engine import Merge, RunOptions

    out = tmp_path / "out"
    recipe = Recipe("ties", os.path.join(models, "base"), tuple(Expert(e) for e in experts_of(models)), str(out))
    with pytest.raises(UsageError, match="--report"):
        Merge(recipe, RunOptions(device="cpu", quiet=True, ray="local", report=str(tmp_path / "r.json")))
    assert not out.exists()


def test_a_ray_task_neither_validates_nor_plans(models, tmp_path, monkeypatch):
    """A shard task receives the driver's decisions (a TensorJob) and only opens the inputs: with
    validation and planning made to fail, it still writes the shard a local merge writes."""
    from streammerge.engine import Merge, RunOptions, inputs, placement
    from streammerge.engine import ray as ray_executor
    from streammerge.recipe import Expert, Recipe

    experts = tuple(Expert(e) for e in experts_of(models))
    recipe = Recipe("ties", os.path.join(models, "base"), experts, str(tmp_path / "local"), shard_size="1MB")
    merger = Merge(recipe, RunOptions(device="cpu", quiet=True))
    try:
        merger.run()
        shard = merger.shards[1]
        job = merger.job().for_tensors(t.name for t in shard.tensors)
    finally:
        merger.close()
    local = json.load(open(tmp_path / "local" / "streammerge.json"))["finished"][shard.filename]

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray task validated or planned")

    for module, name in [(inputs, "check_compatible"), (inputs, "check_config"), (inputs, "open_merge"),
                         (placement, "make_plan"), (Recipe, "validate")]:  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    (tmp_path / "task").mkdir()
    task_recipe = Recipe("ties", recipe.base, recipe.experts, str(tmp_path / "task"), shard_size="1MB")
    name, sha, size = ray_executor.merge_shard_task(task_recipe, RunOptions(device="cpu"), job, shard, None)
    assert (name, sha, size) == (shard.filename, local["sha256"], local["size"])
    assert filecmp.cmp(tmp_path / "task" / name, tmp_path / "local" / name, shallow=False)
