"""Record the sha256 of every output file of a fixed set of merges, and compare with a record.

The guard of a redesign that must not change output bytes (#23): run it on the commit before the
change with `--record`, and after it without; it exits 1 when any output file differs.

    python bench/byte_identity.py --record bench/results/byte-identity.json   # before
    python bench/byte_identity.py --compare bench/results/byte-identity.json  # after

Cases: the demo (tools/demo.sh's models and command), task arithmetic, TIES at model scope,
OrthoMerge C and G, TSV-M (a spectral method), a merge of PEFT LoRA experts, an OFT adapter
merge to an adapter, a merge killed (SIGKILL mid-shard) and resumed, and TIES at model scope on
a local Ray cluster (skipped, and said so, where Ray is not installed). Toy models are made by
tools/make_toy_models.py (deterministic) under bench/.work/byte-identity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", ".work", "byte-identity")


def make(folder: str, *args: str) -> str:
    path = os.path.join(WORK, folder)
    if not os.path.exists(os.path.join(path, "base", "model.safetensors.index.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_toy_models.py"), path, *args], check=True)
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streammerge.cli", "merge", "--quiet", "--device", "cpu", "--threads", "2", *args]


def experts(models: str, n: int = 3) -> list[str]:
    out = []
    for i in range(1, n + 1):
        out += ["--expert", os.path.join(models, f"expert-{i}")]
    return out


def digests(out: str) -> dict[str, str]:
    """sha256 of every file the merge wrote (the journal and the model card hold paths: left out;
    an adapter config names its base by path: the checkout's folder is replaced by <work>)."""
    skip = {"streammerge.json", "README.md"}
    found = {}
    for f in sorted(os.listdir(out)):
        if f in skip or not os.path.isfile(os.path.join(out, f)):
            continue
        data = open(os.path.join(out, f), "rb").read()
        if f.endswith(".json"):
            data = data.replace(WORK.encode(), b"<work>")
        found[f] = hashlib.sha256(data).hexdigest()
    return found


def killed_and_resumed(cmd: list[str], out: str) -> None:
    """SIGKILL the merge once it has made progress durable, then rerun it to the end."""
    proc = subprocess.Popen(cmd)
    journal = os.path.join(out, "streammerge.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            doc = json.load(open(journal))
            if doc.get("partial") or doc.get("finished"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True)


def cases() -> list[tuple[str, list[str], str]]:
    """(name, the merge's arguments without --out, how it runs: plain, killed or ray)."""
    demo = make("demo", "--preset", "small", "--experts", "3", "--shard-size", "2MB")
    small = make("small", "--preset", "small", "--layers", "6", "--experts", "3", "--shard-size", "1MB")
    lowrank = make("lowrank", "--preset", "tiny", "--experts", "3", "--kind", "lowrank", "--shard-size", "60KB")
    lora = make("lora", "--preset", "tiny", "--experts", "3", "--kind", "lora")
    oft = make("oft", "--preset", "tiny", "--experts", "3", "--kind", "oft", "--dtype", "float32")

    def base(m: str) -> list[str]:
        return ["--base", os.path.join(m, "base")]

    return [
        ("demo-ties", [*base(demo), *experts(demo), "--method", "ties", "--shard-size", "2MB"], "plain"),
        (
            "task_arithmetic",
            [*base(small), *experts(small), "--method", "task_arithmetic", "--shard-size", "300KB"],
            "plain",
        ),
        (
            "ties-model",
            [*base(small), *experts(small), "--method", "ties", "--ties-scope", "model", "--shard-size", "300KB"],
            "plain",
        ),
        (
            "orthomerge-c",
            [*base(lowrank), *experts(lowrank), "--method", "orthomerge", "--target", "conflict"],
            "plain",
        ),
        ("orthomerge-g", [*base(lowrank), *experts(lowrank), "--method", "orthomerge", "--target", "global"], "plain"),
        ("tsv", [*base(lowrank), *experts(lowrank), "--method", "tsv"], "plain"),
        ("lora-experts-ties", [*base(lora), *experts(lora), "--method", "ties"], "plain"),
        (
            "oft-adapter-out",
            [*base(oft), *experts(oft), "--method", "orthomerge", "--output-format", "adapter"],
            "plain",
        ),
        (
            "ties-model-killed",
            [
                *base(small),
                *experts(small),
                "--method",
                "ties",
                "--ties-scope",
                "model",
                "--shard-size",
                "5GB",
                "--checkpoint-every",
                "0",
            ],
            "killed",
        ),
        (
            "ties-model-ray",
            [*base(small), *experts(small), "--method", "ties", "--ties-scope", "model", "--shard-size", "300KB"],
            "ray",
        ),
    ]


def run_all(only: list[str] | None) -> dict[str, dict[str, str]]:
    results: dict[str, dict[str, str]] = {}
    for name, args, how in cases():
        if only and name not in only:
            continue
        out = os.path.join(WORK, "out", name)
        shutil.rmtree(out, ignore_errors=True)
        cmd = cli(*args, "--out", out)
        started = time.monotonic()
        if how == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print(f"{name}: skipped (Ray is not installed)")
                continue
            subprocess.run([*cmd, "--ray", "local"], check=True)
        elif how == "killed":
            killed_and_resumed(cmd, out)
        else:
            subprocess.run(cmd, check=True)
        results[name] = digests(out)
        print(f"{name}: {len(results[name])} files, {time.monotonic() - started:.1f} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", help="write the digests to this JSON file")
    group.add_argument("--compare", help="compare with the digests in this JSON file (exit 1 on any difference)")
    ap.add_argument("--only", nargs="+", help="case names to run")
    args = ap.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results = run_all(args.only)
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"commit": commit, "cases": results}, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(results)} case(s) at {commit} in {args.record}")
        return 0
    recorded = json.load(open(args.compare))
    differ = 0
    for name, files in results.items():
        before = recorded["cases"].get(name)
        if before is None:
            print(f"{name}: not in the record")
            differ += 1
        elif before != files:
            changed = sorted(f for f in set(before) | set(files) if before.get(f) != files.get(f))
            print(f"{name}: DIFFERS in {', '.join(changed)}")
            differ += 1
        else:
            print(f"{name}: identical ({len(files)} files)")
    print(
        f"{len(results) - differ} of {len(results)} case(s) byte-identical to {recorded['commit']} (this is {commit})"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
