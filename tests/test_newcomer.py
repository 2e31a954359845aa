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
    # every tensor kind named in full, its columns where the header puts them
    header, row = r.output.splitlines()[0], next(x for x in r.output.splitlines() if "post_attention" in x)
    assert row.startswith("model.layers.N.post_attention_layernorm.weight ")
    end = header.index("count") + 5  # the count column's right edge
    assert (
        row[end - 1].isdigit()
        and row[end] == " "
        and not row[len("model.layers.N.post_attention_layernorm.weight")].strip()
    )


def test_method_flag_beside_a_mergekit_recipe_is_refused(toy_untied, tmp_path):
    """A mergekit recipe's parameters mean what mergekit says: another method beside it would give
    them our meaning (#24: --method switched semantics and then rejected mergekit's normalize)."""
    recipe = {
        "merge_method": "ties",
        "base_model": os.path.join(toy_untied, "base"),
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts_of(toy_untied, 2)],
        "parameters": {"normalize": True},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--method", "task_arithmetic",
            "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.exit_code == 2 and "--method cannot change a mergekit recipe's merge_method" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "orthomerge", "--lambda", "0.5"], "unknown parameter(s) lambda (known:"),
        (
            ["--method", "linear", "--weight", "1"],
            "error: give one --weight per --expert, or none (1 --weight for 2 --expert)",
        ),
        (
            ["--method", "ties", "--output-format", "adapter"],
            "OrthoMerge of PEFT OFT adapters as one adapter: --method orthomerge (any method's merge as a LoRA "
            "adapter: --output-format lora --rank R)",
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


# -- a user's first hour (#24) -------------------------------------------------------------------


def merge_cli(toy: str, out, *args: str, n: int = 2):
    return cli("merge", "--quiet", *flags(toy, n), "--out", str(out), *args)


def one_line(r) -> bool:
    return len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "method,n,params,message",
    [
        ("slerp", 2, ["--param", "t=0.5"], "slerp takes exactly 1 expert(s), got 2"),
        ("nearswap", 2, ["--param", "t=0.5"], "nearswap takes exactly 1 expert(s), got 2"),
        ("arcee_fusion", 2, [], "arcee_fusion takes exactly 1 expert(s), got 2"),
        ("nuslerp", 3, [], "nuslerp takes exactly 2 expert(s), got 3"),
        ("passthrough", 1, [], "passthrough takes one model (or layer slices) and no experts, got 1"),
    ],
)
def test_expert_counts_are_checked_before_anything_is_written(toy_untied, tmp_path, method, n, params, message):
    """#24.1: checked with the recipe (exit 2), not at the first tensor, and nothing under --out."""
    out = tmp_path / "o"
    r = merge_cli(toy_untied, out, "--method", method, *params, n=n)
    assert r.exit_code == 2 and message in r.output and one_line(r), r.output
    assert not out.exists()


def test_a_journal_with_no_finished_work_never_blocks_a_different_command(toy_untied, tmp_path):
    """#24.1: a merge that stopped before finishing a shard (here: NaN in an expert) leaves its
    journal; the corrected command replaces it without --restart. A --max-ram refusal writes nothing."""
    bad = tmp_path / "bad"
    shutil.copytree(experts_of(toy_untied)[1], bad)
    index = json.load(open(bad / "model.safetensors.index.json"))
    name = "model.norm.weight"
    from safetensors.torch import load_file, save_file

    shard = bad / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name][0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "o"
    r = cli("merge", "--quiet", "--base", os.path.join(toy_untied, "base"), "--expert", experts_of(toy_untied)[0],
            "--expert", str(bad), "--method", "ties", "--out", str(out), "--shard-size", "5GB")  # fmt: skip
    assert r.exit_code == 3 and "contains NaN or Inf" in r.output
    assert (out / "streammerge.json").exists() and not json.load(open(out / "streammerge.json"))["finished"]
    r = merge_cli(toy_untied, out, "--method", "ties", "--shard-size", "5GB")
    assert r.exit_code == 0, r.output
    assert cli("verify", str(out)).exit_code == 0
    r = merge_cli(toy_untied, tmp_path / "small", "--method", "ties", "--max-ram", "1MB")
    assert r.exit_code == 4 and "give at least --max-ram" in r.output and one_line(r)
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("flag", ["--report", "--memory-report"])
def test_output_files_are_checked_before_any_work(toy_untied, tmp_path, flag):
    """#24.2: a report path in a folder that does not exist is refused up front, not mid-merge."""
    out = tmp_path / "o"
    r = merge_cli(toy_untied, out, "--method", "ties", flag, str(tmp_path / "nodir" / "r.json"))
    assert r.exit_code == 2 and f"{flag} " in r.output and "does not exist" in r.output and one_line(r), r.output
    assert not out.exists()


def test_flags_beside_a_recipe_override_every_value_it_holds(toy_untied, tmp_path):
    """#24.3: --density beside per-model densities, and --weight beside a recipe's experts, win."""
    recipe = {
        "merge_method": "ties",
        "base_model": os.path.join(toy_untied, "base"),
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.3}} for e in experts_of(toy_untied, 2)],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli("merge", "--quiet", "--recipe", str(path), "--out", str(tmp_path / "a")).exit_code == 0
    r = cli("merge", "--quiet", "--recipe", str(path), "--density", "0.9", "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    for model in recipe["models"]:
        model["parameters"]["density"] = 0.9
    path.write_text(yaml.safe_dump(recipe))
    assert cli("merge", "--quiet", "--recipe", str(path), "--out", str(tmp_path / "c")).exit_code == 0
    shards = lambda out: {f: open(out / f, "rb").read() for f in os.listdir(out) if f.startswith("model-")}  # noqa: E731
    assert shards(tmp_path / "b") == shards(tmp_path / "c") != shards(tmp_path / "a")
    r = cli("merge", "--quiet", "--recipe", str(path), "--weight", "0.5", "--weight", "2", "--out", str(tmp_path / "d"))
    assert r.exit_code == 0, r.output
    for model, w in zip(recipe["models"], (0.5, 2)):
        model["parameters"]["weight"] = w
    path.write_text(yaml.safe_dump(recipe))
    assert cli("merge", "--quiet", "--recipe", str(path), "--out", str(tmp_path / "e")).exit_code == 0
    assert shards(tmp_path / "d") == shards(tmp_path / "e")
    r = cli("merge", "--quiet", "--recipe", str(path), "--weight", "1", "--out", str(tmp_path / "f"))
    assert r.exit_code == 2 and "give one --weight per expert of the recipe" in r.output and one_line(r)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "task_arithmetic", "--density", "0.9"], "unknown parameter(s) density (known: lambda)"),
        (["--method", "linear", "--density", "0.9"], "unknown parameter(s) density (known: normalize)"),
        (["--method", "orthomerge", "--density", "0.5"], "density is a parameter of the residual method"),
        (["--method", "ties", "--drop-rate", "0.5"], "unknown parameter(s) drop_rate"),
        # #24.8: the parameter and the type it takes, not a Python comparison error
        (["--method", "ties", "--param", "density=abc"], "method ties: density must be a number, not 'abc'"),
        (["--method", "ties", "--param", "lambda=abc"], "method ties: lambda must be a number, not 'abc'"),
        (["--method", "karcher", "--param", "max_iter=2.5"], "max_iter must be a whole number, not 2.5"),
        (["--method", "linear", "--param", "normalize=maybe"], "normalize must be true or false, not 'maybe'"),
    ],
)
def test_a_parameter_the_method_does_not_use_or_of_the_wrong_type_is_refused(toy_untied, tmp_path, args, message):
    """#24.4 and #24.8: nothing accepted and ignored; a wrong type named with the parameter."""
    r = merge_cli(toy_untied, tmp_path / "o", *args)
    assert r.exit_code == 2 and message in r.output and one_line(r), r.output


def test_density_goes_to_a_residual_method_that_takes_it(toy_untied):
    r = cli("plan", *flags(toy_untied), "--method", "orthomerge", "--density", "0.5", "--residual-method", "ties")
    assert r.exit_code == 0, r.output


def test_resume_refuses_inputs_that_changed_and_names_the_file(toy_untied, tmp_path):
    """#24.5: an expert saved over with other values of the same shapes after some shards were
    merged: the resume is refused (exit 5) naming that file, and --restart merges again."""
    expert = tmp_path / "e1"
    shutil.copytree(experts_of(toy_untied)[0], expert)
    bad = tmp_path / "e2"
    shutil.copytree(experts_of(toy_untied)[1], bad)
    from safetensors.torch import load_file, save_file

    last = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    good = load_file(str(bad / last))
    broken = {k: v.clone() for k, v in good.items()}
    first = next(iter(broken))
    broken[first].view(-1)[0] = float("nan")
    save_file(broken, str(bad / last), metadata={"format": "pt"})
    out = tmp_path / "o"
    args = ["--base", os.path.join(toy_untied, "base"), "--expert", str(expert), "--expert", str(bad),
            "--method", "ties", "--out", str(out), "--shard-size", "30KB"]  # fmt: skip
    r = cli("merge", "--quiet", *args)
    assert r.exit_code == 3, r.output  # NaN in a later shard: the first shards are finished
    assert json.load(open(out / "streammerge.json"))["finished"]
    save_file(good, str(bad / last), metadata={"format": "pt"})  # the culprit mended …
    retrained = sorted(f for f in os.listdir(expert) if f.endswith(".safetensors"))[0]
    tensors = load_file(str(expert / retrained))
    save_file(
        {k: v * 1.5 for k, v in tensors.items()}, str(expert / retrained), metadata={"format": "pt"}
    )  # … and e1 retrained
    r = cli("merge", "--quiet", *args)
    assert r.exit_code == 5 and str(expert / retrained) in r.output and "changed since" in r.output, r.output
    assert one_line(r)
    r = cli("merge", "--quiet", *args, "--restart")
    assert r.exit_code == 0, r.output
    assert cli("verify", str(out)).exit_code == 0


def test_the_python_api_uses_the_free_cores_as_the_cli_does(toy_untied, tmp_path, monkeypatch):
    """#24.6: merge() chooses its threads like the CLI (cpu.choose_threads), not torch's default."""
    import torch

    from streammerge import Expert, Recipe, merge
    from streammerge import cpu

    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "choose_threads", lambda requested=None: 1)
    try:
        torch.set_num_threads(2)
        recipe = Recipe("ties", os.path.join(toy_untied, "base"), tuple(Expert(e) for e in experts_of(toy_untied)),
                        str(tmp_path / "o"))  # fmt: skip
        assert merge(recipe).threads == 1
    finally:
        torch.set_num_threads(before)


def test_recipe_files_name_the_bad_value_and_where(toy_untied, tmp_path):
    """#24.8: `density: abc` in a recipe (top level and per expert), YAML errors with line and column,
    and every unsupported mergekit key at once."""
    base, (e1, e2) = os.path.join(toy_untied, "base"), experts_of(toy_untied, 2)
    path = tmp_path / "r.yaml"

    def run(doc) -> object:
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return cli("merge", "--quiet", "--recipe", str(path), "--out", str(tmp_path / "o"))

    r = run({"method": "ties", "base": base, "experts": [e1, e2], "parameters": {"density": "abc"}})
    assert r.exit_code == 2 and "density must be a number, not 'abc'" in r.output and one_line(r), r.output
    r = run({"method": "ties", "base": base, "experts": [{"path": e1, "density": "abc"}, e2]})
    assert r.exit_code == 2 and f"expert {e1}: density must be a number, not 'abc'" in r.output, r.output
    r = run("method: ties\nbase: x\nexperts: [a, b\nout: o\n")
    assert r.exit_code == 2 and f"{path}:4:4: not valid YAML (" in r.output and one_line(r), r.output
    r = run({"merge_method": "ties", "base_model": base, "models": [e1], "modules": {}, "foo": 1, "bar": 2})
    assert r.exit_code == 2 and "'modules'" in r.output and "bar, foo" in r.output and one_line(r), r.output


def test_messages_are_consistent_and_true(toy_untied, tmp_path):
    """#24.9: no thread-count line before an error; `no such folder` / `not a folder` alike in merge
    and verify; --out naming a file; a missing recipe or report file is exit 3 alike."""
    r = CliRunner().invoke(main, ["merge", *flags(toy_untied), "--method", "tiez", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and one_line(r), r.output
    r = cli("merge", "--quiet", "--base", str(tmp_path / "nope"), "--expert", experts_of(toy_untied)[0],
            "--method", "ties", "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.exit_code == 3 and f"{tmp_path / 'nope'}: no such folder" in r.output
    (tmp_path / "file").write_text("x")
    r = cli("verify", str(tmp_path / "file"))
    assert r.exit_code == 3 and "not a folder" in r.output
    r = merge_cli(toy_untied, tmp_path / "file", "--method", "ties")
    assert r.exit_code == 4 and "is a file, not a folder" in r.output and one_line(r), r.output
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 3 and one_line(r)
    r = cli("report", str(tmp_path / "missing.json"))
    assert r.exit_code == 3 and "no such file" in r.output and one_line(r)


def test_report_plots_without_matplotlib_say_how_to_get_it(tmp_path):
    argv = ["streammerge", "report", str(tmp_path / "r.json"), "--plots", str(tmp_path)]
    code = (
        f"import sys; sys.modules['matplotlib'] = None; from streammerge.cli import main; sys.argv = {argv!r}; main()"
    )
    (tmp_path / "r.json").write_text(json.dumps({"tensors": {}}))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "pip install -e '.[report]'" in r.stderr and r.stdout == "", r.stderr


def test_an_option_without_its_value_is_refused_not_given_the_next_option(toy_untied, tmp_path):
    """`--memory-report --out DIR`: click alone would write the report to a file named "--out"
    and read DIR as the recipe (a "cannot read" error naming DIR)."""
    out = tmp_path / "o"
    r = cli("merge", "--quiet", *flags(toy_untied), "--method", "linear", "--memory-report", "--out", str(out))
    assert r.exit_code == 2 and one_line(r) and not out.exists() and not os.path.exists("--out")
    assert "--memory-report takes a value, and --out after it is an option" in r.output, r.output
    r = cli("plan", "--base", "--expert", experts_of(toy_untied, 1)[0], "--method", "linear")
    assert r.exit_code == 2 and "--base takes a value, and --expert after it" in r.output and one_line(r)
    r = cli("merge", "--quiet", *flags(toy_untied), "--method", "linear", "--out=" + str(out), "--threads", "1")
    assert r.exit_code == 0 and out.exists(), r.output


def test_mergekit_habits(toy_untied, tmp_path):
    """#24.10: `merge RECIPE OUT` (mergekit's order), its flags answered with ours, a mergekit-moe
    recipe refused as such, and the README's slerp recipe written with `slices:` merged as with `models:`."""
    base, (e1,) = os.path.join(toy_untied, "base"), experts_of(toy_untied, 1)
    layers = json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"]
    sliced = {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, layers]}, {"model": e1, "layer_range": [0, layers]}]}
        ],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
    }
    (tmp_path / "sliced.yaml").write_text(yaml.safe_dump(sliced))
    r = cli("merge", "--quiet", str(tmp_path / "sliced.yaml"), str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    models = {k: v for k, v in sliced.items() if k != "slices"} | {"models": [{"model": base}, {"model": e1}]}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    assert (
        cli("merge", "--quiet", "--recipe", str(tmp_path / "models.yaml"), "--out", str(tmp_path / "b")).exit_code == 0
    )
    shards = lambda out: {f: open(out / f, "rb").read() for f in os.listdir(out) if f.startswith("model-")}  # noqa: E731
    assert shards(tmp_path / "a") == shards(tmp_path / "b")
    sliced["slices"][0]["sources"][1]["layer_range"] = [0, 1]
    (tmp_path / "sliced.yaml").write_text(yaml.safe_dump(sliced))
    r = cli("merge", "--quiet", str(tmp_path / "sliced.yaml"), str(tmp_path / "c"))
    assert r.exit_code == 2 and "is not the whole model" in r.output and "models:" in r.output and one_line(r)
    r = cli("merge", "--cuda", str(tmp_path / "models.yaml"), str(tmp_path / "d"))
    assert r.exit_code == 2 and "--device cuda" in r.output and one_line(r), r.output
    moe = {"base_model": base, "gate_mode": "hidden", "experts": [{"source_model": e1, "positive_prompts": ["x"]}]}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(moe))
    r = cli("merge", "--quiet", str(tmp_path / "moe.yaml"), str(tmp_path / "e"))
    assert r.exit_code == 2 and "mixture-of-experts models are not supported" in r.output and one_line(r)


def test_verify_checks_what_a_loader_needs(toy_untied, tmp_path):
    """#24.13: config and tokenizer files the base had, and a config that agrees with the tensors."""
    out = tmp_path / "o"
    assert merge_cli(toy_untied, out, "--method", "ties").exit_code == 0
    assert cli("verify", str(out)).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"hidden_size": config["hidden_size"] + 1}))
    r = cli("verify", str(out))
    assert r.exit_code == 3 and "hidden_size is" in r.output and "the tensors say" in r.output, r.output
    os.remove(out / "config.json")
    tokenizer = next(f for f in ("tokenizer.json", "tokenizer_config.json") if (out / f).exists())
    os.remove(out / tokenizer)
    r = cli("verify", str(out))
    assert r.exit_code == 3 and "config.json: missing" in r.output and f"{tokenizer}: missing" in r.output, r.output


def test_the_demo_experts_conflict_so_orthomerge_rotates(tmp_path):
    """#24.14: tools/demo.sh's experts (--shared 0.7) make OrthoMerge do something: its report
    shows a rotation share above 0."""
    demo = open(os.path.join(ROOT, "tools", "demo.sh")).read()
    assert "--shared 0.7" in demo and "--report" in demo
    toy = make_toy(str(tmp_path / "demo"), "--preset", "tiny", "--experts", "3", "--shared", "0.7")
    r = cli("merge", "--quiet", *flags(toy, 3), "--method", "orthomerge", "--out", str(tmp_path / "o"),
            "--report", str(tmp_path / "r.json"))  # fmt: skip
    assert r.exit_code == 0, r.output
    shares = [t.get("rotation_share", 0.0) for t in json.load(open(tmp_path / "r.json"))["tensors"].values()]
    assert max(shares) > 0.05


@pytest.mark.parametrize("gpu", [False, True])
def test_install_scripts_choose_the_cpu_build_without_a_gpu(tmp_path, gpu):
    """#24.16: with no torch installed, tools/install_torch.sh asks PyTorch's CPU index where there
    is no NVIDIA GPU and a plain install where there is one; both set-up scripts call it. Run with
    a stand-in Python that has no torch and records what pip is asked."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-c" ]; then [ -e "$CALLS" ] && exit 0; exit 1; fi\n'  # no torch until pip ran
        'echo "$@" >> "$CALLS"\n'
    )
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "install_torch.sh")], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    first = calls.read_text().splitlines()[0]
    assert "torch==2.13.0" in first and ("whl/cpu" in first) == (not gpu), first
    for name in ("demo.sh", "run_tests.sh"):
        assert "bash tools/install_torch.sh" in open(os.path.join(ROOT, "tools", name)).read()


def test_names_that_exist(toy_untied, tmp_path):
    """#24.17: install hints name the clone's extras; the card links nowhere that does not exist and
    names the method the user asked for."""
    for path in ("streammerge/report.py", "streammerge/engine/ray.py", "README.md", "docs/diagnostics.md"):
        assert "streammerge[" not in open(os.path.join(ROOT, path)).read(), path
    recipe = {
        "merge_method": "ties",
        "base_model": os.path.join(toy_untied, "base"),
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts_of(toy_untied, 2)],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")).exit_code == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "method `ties` (a mergekit recipe" in card and "gta" not in card and "pypi.org" not in card


def test_progress_moves_inside_long_tensors(tmp_path):
    """#24.11: OrthoMerge reports its steps inside a tensor (targets, Procrustes solves), and a
    row-block method its blocks, so the bar and its estimate move during a tensor of many minutes."""
    from streammerge.engine import Merge, RunOptions
    from streammerge.methods import base as method_base
    from streammerge.recipe import Expert, Recipe

    toy = make_toy(str(tmp_path / "toy"), "--preset", "tiny", "--experts", "3", "--shared", "0.7")
    experts = tuple(Expert(e) for e in experts_of(toy, 3))
    for method, shrink in (("orthomerge", False), ("task_arithmetic", True)):
        merger = Merge(
            Recipe(method, os.path.join(toy, "base"), experts, str(tmp_path / method)), RunOptions(quiet=True)
        )
        try:
            computer = merger.computer()
            tensor = max((t for s in merger.shards for t in s.tensors if len(t.shape) == 2), key=lambda t: t.nbytes)
            seen: list[float] = []
            old = method_base.BLOCK_ELEMENTS
            method_base.BLOCK_ELEMENTS = 1000 if shrink else old
            try:
                computer.merge(tensor, None, seen.append)
            finally:
                method_base.BLOCK_ELEMENTS = old
        finally:
            merger.close()
        assert len(seen) >= 4 and seen == sorted(seen) and 0 <= seen[0] and seen[-1] <= 1, (method, seen)


def test_progress_counts_resumed_bytes_as_done_not_as_speed(monkeypatch):
    """#24.11: after a resume, the estimate comes from the bytes merged since the start only; off a
    terminal the progress is a log line, never a carriage return."""
    from streammerge.engine.shards import Progress, resumed_bytes
    from streammerge.engine.inputs import OutputTensor, Shard

    shard = Shard(
        "model-00001-of-00001.safetensors", tuple(OutputTensor(f"t{i}", "F32", (25,), True) for i in range(4))
    )
    assert resumed_bytes([shard], {"shard": shard.filename, "tensors": 3, "offset": 0}) == 300
    p = Progress(total=1000, initial=600, desc="merging", quiet=False)  # stderr under pytest: no terminal
    assert p.bar is None
    p.started -= 10.0  # ten seconds since the start
    p.within(100)(0.5)
    p.done(100, 0)
    assert p.n == 700 and "700 B of 1.00 KB (70 %), about 30 s left" in p.line()


def test_no_carriage_returns_off_a_terminal(toy_untied, tmp_path):
    r = subprocess.run([sys.executable, "-m", "streammerge.cli", "merge", *flags(toy_untied), "--method", "ties",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "\r" not in r.stderr and "merged into" in r.stderr, r.stderr


def test_whole_model_density_gradients_and_other_architectures_are_refused_first(toy_untied, tmp_path):
    """#24.1 and #24.7: a TIES scope=model recipe with a density gradient is refused before the
    output folder exists; an expert of another architecture gets the one config line, not one line
    per tensor; `--param tie_break=index` with our ties says where tie_break belongs."""
    base, (e1, e2) = os.path.join(toy_untied, "base"), experts_of(toy_untied, 2)
    recipe = {
        "method": "ties",
        "base": base,
        "experts": [e1, e2],
        "parameters": {"scope": "model", "density": [0.2, 0.5]},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = cli("merge", "--quiet", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "density must be one value per expert" in r.output and one_line(r), r.output
    assert not (tmp_path / "o").exists()
    other = make_toy(str(tmp_path / "other"), "--preset", "small", "--layers", "2", "--experts", "1")
    r = cli("merge", "--quiet", "--base", base, "--expert", e1, "--expert", experts_of(other, 1)[0],
            "--method", "ties", "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.exit_code == 3 and "hidden_size is" in r.output and one_line(r), r.output
    r = merge_cli(toy_untied, tmp_path / "o", "--method", "ties", "--param", "tie_break=index")
    assert r.exit_code == 2 and "tie_break belongs to mergekit's ties" in r.output and one_line(r), r.output


def test_what_the_hub_expects_of_a_merged_model(toy_untied, toy_tied, tmp_path):
    """#25.6–7: the card's front matter names every input and the relation; a mergekit recipe is
    also written as mergekit_config.yml; the output dtype is in config.json under both names; a
    base that ties lm_head to the embedding gives an output without a separate lm_head."""
    base, (e1, e2) = os.path.join(toy_untied, "base"), experts_of(toy_untied, 2)
    recipe = {"merge_method": "ties", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in (e1, e2)]}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "o"
    assert cli("merge", "--quiet", str(tmp_path / "r.yaml"), str(out)).exit_code == 0
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == [base, e1, e2] and front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers" and "merge" in front["tags"]
    assert (out / "mergekit_config.yml").read_text() == (tmp_path / "r.yaml").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert cli("verify", str(out)).exit_code == 0
    tied = tmp_path / "tied"
    assert merge_cli(toy_tied, tied, "--method", "task_arithmetic").exit_code == 0
    names = json.load(open(tied / "model.safetensors.index.json"))["weight_map"]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert not (tied / "mergekit_config.yml").exists()


def test_a_record_from_before_file_times_asks_for_restart(toy_untied, tmp_path):
    """A merge journalled by a version whose fingerprint held no file times is not resumed blindly."""
    out = tmp_path / "o"
    r = merge_cli(toy_untied, out, "--method", "ties", "--shard-size", "30KB", "--param", "lambda=0.5")
    assert r.exit_code == 0
    record = json.load(open(out / "streammerge.json"))
    for entry in record["inputs"].values():
        entry.pop("mtime_ns", None)
        entry.pop("inode", None)
    record["complete"] = False
    record["fingerprint"] = "0" * 64  # that version hashed its record without the times
    (out / "streammerge.json").write_text(json.dumps(record))
    os.remove(out / "model.safetensors.index.json")
    r = merge_cli(toy_untied, out, "--method", "ties", "--shard-size", "30KB", "--param", "lambda=0.5")
    assert r.exit_code == 5 and "started by an earlier streammerge" in r.output and one_line(r), r.output


def test_the_demo_gives_a_weight_per_model_to_every_method_that_needs_one():
    """tools/demo.sh METHOD for a method that, as in mergekit, needs a weight per model (della,
    breadcrumbs, gta, multislerp) passes one for each of its three experts: without, the demo of
    `tools/demo.sh della` stopped at "expert demo/expert-1 has no 'weight'"."""
    import fnmatch
    import re

    from streammerge.methods import get_method, method_names
    from streammerge.methods.base import REQUIRED

    demo = open(os.path.join(ROOT, "tools", "demo.sh")).read()
    case = re.search(r"^\s*([^\n]*)\) WEIGHTS=\(--weight 1 --weight 1 --weight 1\)", demo, re.M)
    assert case, "demo.sh's case of the methods given weights"
    patterns = [p.strip() for p in case.group(1).split("|")]
    for name in method_names():
        method, _ = get_method(name)
        three = method.min_experts <= 3 and (method.max_experts is None or method.max_experts >= 3)
        if method.expert_params.get("weight") is REQUIRED and three:
            assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_a_log_line_during_a_merge_goes_above_the_progress_bar(monkeypatch, capsys):
    """On a terminal, a line logged while the bar is shown (numba compiling, a shard resumed) is
    written on a line of its own, and logging is as before once the bar closes."""
    import logging

    from streammerge.engine.shards import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    progress = Progress(100, 0, "merging (ties, cpu)", quiet=False)
    progress.done(10, 10)
    logging.getLogger("streammerge.math.fused").info("compiling numba kernels")
    progress.close()
    assert root.handlers == [handler]
    line = next(x for x in capsys.readouterr().err.split("\n") if "compiling" in x)
    assert line.split("\r")[-1] == "compiling numba kernels", repr(line)


def test_without_numba_a_merge_that_would_take_its_kernels_says_how_to_get_them(tmp_path, monkeypatch, caplog):
    """`pip install streammerge` leaves out numba (the `fast` extra): TIES and its like then run
    torch's code. plan says so and how to get the kernels, and so does a merge as it starts; a
    method without kernels, or a machine with numba, hears nothing of it."""
    import importlib.util
    import logging

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(8)
    for name in ("base", "e1", "e2"):
        os.makedirs(tmp_path / name)
        w = (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)  # a tensor the kernels would take
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
    inputs = ["--base", str(tmp_path / "base"), "--expert", str(tmp_path / "e1"), "--expert", str(tmp_path / "e2")]
    hint = "pip install 'streammerge[fast]'"
    if importlib.util.find_spec("numba") is not None:  # with numba: nothing said
        assert hint not in cli("plan", *inputs, "--method", "ties").output

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    assert hint in cli("plan", *inputs, "--method", "ties").output
    assert hint not in cli("plan", *inputs, "--method", "linear").output
    with caplog.at_level(logging.INFO):
        r = cli("merge", "--quiet", *inputs, "--method", "ties", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert any(hint in m for m in caplog.messages)


def test_plan_takes_the_merge_command_it_plans(toy_untied, tmp_path):
    """`merge` replaced by `plan` in a command: the options that shape the merge are taken (the LoRA
    output's checked as merge checks them; --report's pass planned), merge's others refused with why,
    one line, exit 2; --report beside an adapter output, which records none, refused by both."""
    base = [*flags(toy_untied), "--method", "ties", "--no-estimate"]

    from streammerge.units import parse_size

    def peak(*extra: str) -> int:
        r = cli("plan", *base, *extra)
        assert r.exit_code == 0, r.output
        line = next(x for x in r.output.splitlines() if x.startswith("peak RAM"))
        return parse_size("".join(line.split()[3:5]))  # "peak RAM (anonymous): N MB of ..."

    assert peak("--report", str(tmp_path / "r.json")) > peak() and not (tmp_path / "r.json").exists()
    assert cli("plan", *base, "--output-format", "lora", "--rank", "8").exit_code == 0
    r = cli("plan", *base, "--output-format", "lora")
    assert r.exit_code == 2 and "--output-format lora needs --rank" in r.output and one_line(r)
    for extra in (["--restart"], ["-q"], ["--checkpoint-every", "5"], ["--memory-report", "m.json"]):
        r = cli("plan", *base, *extra)
        assert r.exit_code == 2 and f"{extra[0]} is an option of merge, not of plan" in r.output and one_line(r)
    for command in ("merge", "plan"):
        out = tmp_path / command
        r = cli(command, *flags(toy_untied), "--method", "orthomerge", "--output-format", "adapter",
                "--report", str(tmp_path / "a.json"), "--out", str(out))  # fmt: skip
        assert r.exit_code == 2 and "records none" in r.output and one_line(r) and not out.exists(), r.output
