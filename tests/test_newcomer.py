"""What a new user meets trying the README (issue: mergekit users switch without surprises):
tokenizer_source and the model card, the output lock, experts' config.json, verify, plan
without --out and for adapters, re-targeted mergekit recipes, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from streammerge.cli import main
from tests.conftest import ROOT, experts_of, make_toy


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def flags(folder: str, n: int = 2) -> list[str]:
    out = ["--base", os.path.join(folder, "base")]
    for e in experts_of(folder, n):
        out += ["--expert", e]
    return out


def test_model_card_and_tokenizer_source(toy_untied, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(os.path.join(toy_untied, "base"), donor)
    tok = json.loads((donor / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 77  # same vocabulary, other settings: copied from the donor
    (donor / "tokenizer_config.json").write_text(json.dumps(tok))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": os.path.join(toy_untied, "base"),
        "tokenizer_source": str(donor),
        "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts_of(toy_untied, 2)],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "o"
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    card = (out / "README.md").read_text()
    assert "streammerge" in card and "merge_method: task_arithmetic" in card and experts_of(toy_untied)[1] in card
    assert cli("verify", str(out)).exit_code == 0
    # a different vocabulary would need embedding surgery: refused before merging
    vocab = json.loads((donor / "tokenizer.json").read_text())
    first = next(iter(vocab["model"]["vocab"]))
    vocab["model"]["vocab"]["zz-new"] = vocab["model"]["vocab"].pop(first)
    (donor / "tokenizer.json").write_text(json.dumps(vocab))
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2"))
    assert (
        r.exit_code == 3 and "vocabulary other than the base's" in r.output and len(r.output.strip().splitlines()) == 1
    )
    assert not os.path.exists(tmp_path / "o2" / "model.safetensors.index.json")


def test_second_merge_into_the_same_folder_names_the_first(toy_untied, tmp_path):
    from streammerge.io.lock import OutputLock

    out = tmp_path / "o"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "streammerge.cli",
        "merge",
        "--quiet",
        "--device",
        "cpu",
        *flags(toy_untied),
        "--method",
        "ties",
        "--out",
        str(out),
    ]
    with OutputLock(str(out)):  # this process plays the merge that is writing there
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 5 and f"another merge (pid {os.getpid()}) is writing there" in second.stderr, (
        second.stderr
    )
    assert second.stderr.count("\n") == 1
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0  # the lock went with the first
    assert not (out / ".streammerge.pid").exists()


def test_expert_config_of_another_architecture_is_refused(toy_untied, tmp_path):
    expert = tmp_path / "e"
    shutil.copytree(experts_of(toy_untied)[0], expert)
    config = json.loads((expert / "config.json").read_text())
    config["num_hidden_layers"] = 3  # same tensor shapes, another model
    (expert / "config.json").write_text(json.dumps(config))
    r = cli(
        "merge",
        "--quiet",
        "--base",
        os.path.join(toy_untied, "base"),
        "--expert",
        str(expert),
        "--method",
        "linear",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 3 and "num_hidden_layers is 3, the base's 2" in r.output
    (expert / "config.json").write_text("{not json")
    r = cli(
        "merge",
        "--quiet",
        "--base",
        os.path.join(toy_untied, "base"),
        "--expert",
        str(expert),
        "--method",
        "linear",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 3 and str(expert / "config.json") in r.output and len(r.output.strip().splitlines()) == 1


def test_verify_missing_folder_and_adapter_output(tmp_path):
    r = cli("verify", str(tmp_path / "nope"))
    assert r.exit_code == 3 and "no such folder" in r.output
    toy = make_toy(
        str(tmp_path / "oft"), "--preset", "tiny", "--experts", "2", "--kind", "oft", "--oft-block-size", "8"
    )
    out = str(tmp_path / "adapter")
    r = cli("merge", "--quiet", *flags(toy), "--method", "orthomerge", "--output-format", "adapter", "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("verify", out)
    assert r.exit_code == 0 and "merged adapter" in r.output, r.output
    r = cli("plan", *flags(toy), "--method", "orthomerge", "--output-format", "adapter")
    assert r.exit_code == 0 and "adapter output:" in r.output, r.output


def test_plan_needs_no_out_and_writes_nothing(toy_untied, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("plan", *flags(toy_untied), "--method", "ties")
    assert r.exit_code == 0, r.output
    assert os.listdir(tmp_path) == []


def test_mergekit_recipe_retargeted_reports_only_what_the_user_wrote(toy_untied, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": os.path.join(toy_untied, "base"),
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts_of(toy_untied, 2)],
        "parameters": {"normalize": True},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = cli(
        "merge",
        "--quiet",
        "--recipe",
        str(tmp_path / "r.yaml"),
        "--method",
        "task_arithmetic",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 2 and "unknown parameter(s) normalize" in r.output and "sparsify" not in r.output, r.output
    del recipe["parameters"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = cli(
        "merge",
        "--quiet",
        "--recipe",
        str(tmp_path / "r.yaml"),
        "--method",
        "task_arithmetic",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "orthomerge", "--lambda", "0.5"], "unknown parameter(s) lambda (known:"),
        (
            ["--method", "linear", "--weight", "1"],
            "error: give one --weight per --expert, or none (1 --weight for 2 --expert)",
        ),
    ],
)
def test_one_line_errors_in_the_users_words(toy_untied, tmp_path, args, message):
    r = cli("merge", "--quiet", *flags(toy_untied), *args, "--out", str(tmp_path / "o"))
    assert (
        r.exit_code == 2
        and message in r.output
        and "lambda_" not in r.output
        and len(r.output.strip().splitlines()) == 1
    ), r.output


def test_dare_takes_density_and_negative_lambda(toy_untied, tmp_path):
    assert (
        cli(
            "merge",
            "--quiet",
            *flags(toy_untied),
            "--method",
            "dare_ties",
            "--density",
            "0.3",
            "--out",
            str(tmp_path / "a"),
        ).exit_code
        == 0
    )
    assert (
        cli(
            "merge",
            "--quiet",
            *flags(toy_untied),
            "--method",
            "task_arithmetic",
            "--lambda",
            "-0.5",
            "--out",
            str(tmp_path / "b"),
        ).exit_code
        == 0
    )


def test_expert_without_an_integer_buffer_of_the_base_merges(tmp_path):
    """Newer transformers do not save `position_ids`; such an expert still merges, and the output
    takes the buffer from the base. A missing float tensor is still refused."""
    import torch
    from safetensors.torch import load_file, save_file

    from streammerge import Expert, Recipe, merge
    from streammerge.errors import InputError

    ids = torch.arange(8).unsqueeze(0)
    for name, tensors in {
        "base": {"w": torch.zeros(4, 4), "ids": ids},
        "expert": {"w": torch.ones(4, 4)},
        "no_float": {"ids": ids},
    }.items():
        os.makedirs(tmp_path / name)
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    merge(Recipe("task_arithmetic", str(tmp_path / "base"), (Expert(str(tmp_path / "expert")),), str(tmp_path / "out")))
    out = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    assert torch.equal(out["ids"], ids) and torch.equal(out["w"], torch.ones(4, 4))
    with pytest.raises(InputError, match="tensor 'w' is missing"):
        merge(
            Recipe(
                "task_arithmetic", str(tmp_path / "base"), (Expert(str(tmp_path / "no_float")),), str(tmp_path / "out2")
            )
        )
