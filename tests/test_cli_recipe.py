"""The CLI and recipe files: same results from flags, our YAML and mergekit's YAML; resume rules."""
from __future__ import annotations

import filecmp
import os

import pytest
import yaml
from click.testing import CliRunner

from streammerge.cli import main
from streammerge.recipe import load_recipe_file
from tests.conftest import experts_of


def invoke(*args: str):
    return CliRunner().invoke(main, ["merge", "--quiet", "--device", "cpu", *args], catch_exceptions=False)


def flags(folder: str) -> list[str]:
    out = ["--base", os.path.join(folder, "base")]
    for e in experts_of(folder):
        out += ["--expert", e]
    return out


def same_shards(a: str, b: str) -> bool:
    names = sorted(f for f in os.listdir(a) if f.endswith(".safetensors") or f.endswith("index.json"))
    return names == sorted(f for f in os.listdir(b) if f.endswith(".safetensors") or f.endswith("index.json")) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names
    )


def test_flags_native_yaml_and_mergekit_yaml_agree(toy_untied, tmp_path):
    r = invoke(*flags(toy_untied), "--method", "ties", "--density", "0.3", "--lambda", "1.0", "--out", str(tmp_path / "flags"))
    assert r.exit_code == 0, r.output
    native = {"method": "ties", "base": os.path.join(toy_untied, "base"), "experts": experts_of(toy_untied),
              "parameters": {"density": 0.3, "lambda": 1.0}, "out": str(tmp_path / "native")}
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    assert invoke("--recipe", str(tmp_path / "native.yaml")).exit_code == 0
    mk = {
        "merge_method": "ties", "base_model": os.path.join(toy_untied, "base"),
        "models": [{"model": os.path.join(toy_untied, "base")}] + [{"model": e, "parameters": {"weight": 1.0, "density": 0.3}} for e in experts_of(toy_untied)],
        "parameters": {"normalize": True, "lambda": 1.0}, "dtype": "bfloat16",
    }
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    assert invoke("--recipe", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "mk")).exit_code == 0
    assert same_shards(str(tmp_path / "flags"), str(tmp_path / "native"))
    assert same_shards(str(tmp_path / "flags"), str(tmp_path / "mk"))


def test_mergekit_dare_density_means_keep_rate(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": "b", "models": [{"model": "e1"}],
        "parameters": {"density": 0.3, "normalize": False},
    }))
    recipe = load_recipe_file(str(tmp_path / "r.yaml"), {"out": "o"})
    method, params = recipe.resolve()
    assert method.name == "dare" and params.combine == "ties" and params.merge == "sum"
    assert params.drop_rate == pytest.approx(0.7)


def test_rerun_of_complete_merge_is_a_noop_and_other_recipe_is_refused(toy_untied, tmp_path):
    out = str(tmp_path / "o")
    assert invoke(*flags(toy_untied), "--method", "task_arithmetic", "--out", out).exit_code == 0
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert invoke(*flags(toy_untied), "--method", "task_arithmetic", "--out", out).exit_code == 0
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    r = invoke(*flags(toy_untied), "--method", "task_arithmetic", "--lambda", "0.5", "--out", out)
    assert r.exit_code == 5 and "different recipe" in r.output
    r = invoke(*flags(toy_untied), "--method", "task_arithmetic", "--lambda", "0.5", "--out", out, "--restart")
    assert r.exit_code == 0
    assert invoke(*flags(toy_untied), "--method", "task_arithmetic", "--lambda", "0.5", "--out", str(tmp_path / "fresh")).exit_code == 0
    assert same_shards(out, str(tmp_path / "fresh"))


def test_help_lists_every_method_and_exit_codes(toy_untied):
    from streammerge.methods import method_names

    r = CliRunner().invoke(main, ["merge", "--help"])
    assert r.exit_code == 0
    for m in method_names():
        assert m in r.output
    r = CliRunner().invoke(main, ["methods"])
    assert "ties" in r.output and "density=0.2" in r.output


def test_usage_errors_exit_2_with_one_line(toy_untied, tmp_path):
    r = invoke(*flags(toy_untied), "--method", "nope", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "unknown merge method 'nope'" in r.output
    r = invoke(*flags(toy_untied), "--method", "ties", "--density", "1.5", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "density = 1.5 is outside (0.0, 1.0]" in r.output
    assert not os.path.exists(tmp_path / "o")
