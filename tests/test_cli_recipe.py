"""The CLI and recipe files: same results from flags, our YAML and mergekit's YAML; resume rules."""

from __future__ import annotations

import filecmp
import os

import pytest
import yaml
from click.testing import CliRunner

from streammerge.cli import main
from streammerge.errors import UsageError
from streammerge.recipe_files import load_recipe_file
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


def test_flags_and_native_yaml_agree_with_weights(toy_untied, tmp_path):
    r = invoke(
        *flags(toy_untied),
        "--weight",
        "1",
        "--weight",
        "0.5",
        "--weight",
        "2",
        "--method",
        "ties",
        "--density",
        "0.3",
        "--lambda",
        "0.8",
        "--out",
        str(tmp_path / "flags"),
    )
    assert r.exit_code == 0, r.output
    native = {
        "method": "ties",
        "base": os.path.join(toy_untied, "base"),
        "experts": [{"path": e, "weight": w} for e, w in zip(experts_of(toy_untied), (1, 0.5, 2))],
        "parameters": {"density": 0.3, "lambda": 0.8},
        "out": str(tmp_path / "native"),
    }
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    assert invoke("--recipe", str(tmp_path / "native.yaml")).exit_code == 0
    assert same_shards(str(tmp_path / "flags"), str(tmp_path / "native"))


def test_mergekit_recipes_map_to_mergekit_semantics(tmp_path):
    """Defaults are mergekit's: density 1, normalize per method, rescale for DARE/DELLA; the base
    listed among the models is not an expert; weight is required."""

    def load(doc):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
        return load_recipe_file(str(tmp_path / "r.yaml"), {"out": "o"})

    r = load(
        {
            "merge_method": "dare_ties",
            "base_model": "b",
            "models": [{"model": "b"}, {"model": "e1", "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.3},
        }
    )
    method, params = r.resolve()
    assert method.name == "gta" and (params.sparsify, params.consensus, params.normalize, params.rescale) == (
        "random",
        "sum",
        False,
        True,
    )
    assert [e.path for e in r.experts] == ["e1"]
    _, values = r.method_and_values("model.layers.0.mlp.up_proj.weight", 0.0)
    assert values.experts[0]["density"] == 0.3 and values.experts[0]["weight"] == 0.5
    r = load({"merge_method": "ties", "base_model": "b", "models": [{"model": "e1", "parameters": {"weight": 1}}]})
    _, values = r.method_and_values("x", 0.0)
    assert values.experts[0]["density"] == 1.0 and values.params.normalize
    with pytest.raises(UsageError, match="model e1 has no weight"):
        load({"merge_method": "ties", "base_model": "b", "models": [{"model": "e1"}]})
    with pytest.raises(UsageError, match="model b has no weight .*adds base_model"):
        load({"merge_method": "linear", "base_model": "b", "models": [{"model": "e1", "parameters": {"weight": 1}}]})
    r = load(
        {
            "merge_method": "linear",
            "base_model": "b",
            "models": [{"model": "b", "parameters": {"weight": 1}}, {"model": "e1", "parameters": {"weight": 3}}],
        }
    )
    assert r.method == "linear" and [(e.path, e.weight) for e in r.experts] == [("b", 1), ("e1", 3)]
    with pytest.raises(UsageError, match="tokenizer_source: union"):
        load(
            {
                "merge_method": "linear",
                "models": [{"model": "e1", "parameters": {"weight": 1}}],
                "tokenizer_source": "union",
            }
        )
    with pytest.raises(UsageError, match="'slices'"):
        load({"merge_method": "passthrough", "slices": []})


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
    assert (
        invoke(
            *flags(toy_untied), "--method", "task_arithmetic", "--lambda", "0.5", "--out", str(tmp_path / "fresh")
        ).exit_code
        == 0
    )
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


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"method": "ties", "base": "b", "experts": ["e"], "paramters": {}}, "unknown key(s) paramters; did you mean "
         "'parameters'? (known: "),
        ({"merge_method": "tie", "base_model": "b", "models": ["e"]},
         "unknown merge_method 'tie'; did you mean 'ties'?"),
        ({"merge_method": "ties", "base_model": "b", "paramters": {}, "models": ["e"]},
         "unknown mergekit key(s) paramters; did you mean 'parameters'? (read here: "),
        ({"merge_method": "ties", "base_model": "b", "parameters": {"normalise": True}, "models": ["e"]},
         "normalise not a parameter of mergekit's ties; did you mean 'normalize'? (known: "),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e", "parameters": {"densty": 0.5}}]},
         "densty not a per-model parameter of mergekit's ties; did you mean 'density'? (known: "),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e", "parameters": {"x": 1, "y": 2}}]},
         "x, y not a per-model parameter of mergekit's ties (known: "),  # two unknown: no guess
    ],
)  # fmt: skip
def test_a_misspelt_recipe_key_is_named_with_the_closest_known_one(tmp_path, doc, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UsageError) as err:
        load_recipe_file(str(path), default_out=str(tmp_path / "out"))
    assert message in str(err.value)
