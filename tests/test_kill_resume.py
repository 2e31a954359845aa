"""SIGKILL a merge subprocess at random points, resume, and compare with an uninterrupted run.

After every kill, each file under a final shard name must be complete: byte-identical to the
same shard of the uninterrupted run. The final output must be byte-identical too.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import experts_of, make_toy

pytestmark = pytest.mark.slow


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
    shard = [] if "--shard-size" in extra else ["--shard-size", "300KB"]
    return cmd + ["--method", method, "--out", out, *shard, *extra]


def final_shards(out: str) -> list[str]:
    return (
        sorted(f for f in os.listdir(out) if f.startswith("model-") and f.endswith(".safetensors"))
        if os.path.isdir(out)
        else []
    )


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> str:
    return make_toy(
        str(tmp_path_factory.mktemp("small")),
        "--preset",
        "small",
        "--layers",
        "6",
        "--experts",
        "3",
        "--shard-size",
        "1MB",
    )


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ties", ("--ties-scope", "model")),
        ("dare", ("--param", "combine=ties", "--seed", "3")),
        # one big shard, progress made durable after every tensor: kills land mid-shard and resume there
        ("ties", ("--ties-scope", "model", "--shard-size", "5GB", "--checkpoint-every", "0")),
    ],
    ids=["ties-model", "dare-ties", "mid-shard"],
)
def test_sigkill_at_random_points_then_resume_is_byte_identical(small_models, tmp_path, method, extra):
    reference = str(tmp_path / "reference")
    subprocess.run(cli(small_models, reference, method, *extra), check=True)
    ref_shards = final_shards(reference)
    assert len(ref_shards) >= (1 if "5GB" in extra else 10)
    resumed_mid_shard = 0

    rng = random.Random(f"kill-{method}")
    kills = 0
    attempts = 0
    out = str(tmp_path / "killed")
    while kills < 6 and attempts < 40:
        attempts += 1
        proc = subprocess.Popen(cli(small_models, out, method, *extra))
        if "--checkpoint-every" in extra:
            # aim inside the shard: wait for a journalled checkpoint, then kill a little later
            record = os.path.join(out, "streammerge.json")
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if json.load(open(record)).get("partial"):
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(0.3, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for shard in final_shards(out):
            assert filecmp.cmp(os.path.join(out, shard), os.path.join(reference, shard), shallow=False), (
                f"{shard} incomplete or different after kill {kills}"
            )
        record = os.path.join(out, "streammerge.json")
        if os.path.exists(record) and json.load(open(record)).get("partial"):
            resumed_mid_shard += 1
        if os.path.exists(os.path.join(out, "model.safetensors.index.json")):
            # finished: start again from nothing so later kills land in other places
            assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
            for f in os.listdir(reference):
                assert filecmp.cmp(os.path.join(out, f), os.path.join(reference, f), shallow=False), f
            subprocess.run(["rm", "-rf", out], check=True)
    subprocess.run(cli(small_models, out, method, *extra), check=True)
    assert kills >= 6, f"only {kills} kills landed in {attempts} attempts"
    if "--checkpoint-every" in extra:
        assert resumed_mid_shard >= 3, resumed_mid_shard
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    for f in os.listdir(reference):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(reference, f), shallow=False), f
    print(
        f"{method}: {kills} SIGKILLs ({resumed_mid_shard} left a mid-shard checkpoint), every resumed output "
        "byte-identical"
    )
