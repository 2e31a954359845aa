"""`--output-format lora`: the merge's update as a PEFT LoRA adapter. PEFT loads it, and its
merge_and_unload equals the best rank-r approximation of our dense merge (to float32 round-off);
the report's energy shares are those of the singular values; an interrupted run resumes to the same
bytes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from streammerge import Recipe
from streammerge.cli import main
from streammerge.engine import Merge, RunOptions
from streammerge.lora_output import LoraOptions, LoraWriter, check_and_fetch, merge_to_lora
from tests.conftest import load_all

RANK = 3


def flags(toy: str) -> list[str]:
    return ["--base", f"{toy}/base", "--expert", f"{toy}/expert-1", "--expert", f"{toy}/expert-2",
            "--method", "ties", "--density", "0.5", "--dtype", "float32", "--shard-size", "60KB"]  # fmt: skip


@pytest.fixture(scope="module")
def outputs(toy_untied, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    runner = CliRunner()
    dense = runner.invoke(main, ["merge", *flags(toy_untied), "--out", str(work / "dense"), "-q"])
    assert dense.exit_code == 0, dense.output
    lora = runner.invoke(main, ["merge", *flags(toy_untied), "--out", str(work / "lora"), "--output-format", "lora",
                                "--rank", str(RANK)])  # fmt: skip
    assert lora.exit_code == 0, lora.output
    assert "updates decomposed; energy kept" in lora.output
    return str(work / "dense"), str(work / "lora")


def best_rank(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float((s[:r] ** 2).sum() / (s**2).sum())


def test_peft_loads_it_and_merge_and_unload_is_the_best_rank_r_approximation(outputs, toy_untied):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    dense, lora = outputs
    base = transformers.AutoModelForCausalLM.from_pretrained(f"{toy_untied}/base", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, lora).merge_and_unload().state_dict()
    want, w0 = load_all(dense), load_all(f"{toy_untied}/base")
    config = json.load(open(os.path.join(lora, "adapter_config.json")))
    assert config["r"] == RANK and config["lora_alpha"] == RANK
    # the layers whose bias changed are whole in modules_to_save; the others decomposed
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {"o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "model.layers.0.self_attn.q_proj" in config["modules_to_save"]
    decomposed = 0
    for name, w in want.items():
        if name not in merged:
            continue  # buffers transformers does not keep
        if name.rsplit(".", 1)[0] in config["target_modules"]:
            approx, _ = best_rank(w.double() - w0[name].double(), RANK)
            ref = w0[name].double() + approx
            decomposed += 1
        else:  # biases (lora_B.bias), norms, embeddings and lm_head (modules_to_save): exact
            ref = w.double()
        scale = ref.abs().max().item()
        assert (merged[name].double() - ref).abs().max().item() <= 1e-5 * scale, name
    assert decomposed == 8


def test_the_report_states_each_updates_energy_kept(outputs, toy_untied):
    dense, lora = outputs
    report = json.load(open(os.path.join(lora, "lora_report.json")))
    want, w0 = load_all(dense), load_all(f"{toy_untied}/base")
    assert len(report) == 8
    for name, row in report.items():
        _, kept = best_rank(want[name].double() - w0[name].double(), RANK)
        assert row["rank"] == RANK and abs(row["energy_kept"] - kept) < 1e-5


def test_an_interrupted_lora_merge_resumes_to_the_same_bytes(outputs, toy_untied, tmp_path, monkeypatch):
    _, lora = outputs
    recipe = Recipe("ties", f"{toy_untied}/base", (f"{toy_untied}/expert-1", f"{toy_untied}/expert-2"),
                    str(tmp_path / "out"), {"density": 0.5}, dtype="float32", shard_size="60KB")  # fmt: skip
    merger = Merge(recipe, RunOptions(quiet=True))
    assert len(merger.inputs.shards) > 2
    stop_at = merger.inputs.shards[-1].tensors[0].name  # in the last shard
    convert = LoraWriter.convert

    def interrupted(self, name, merged):
        if name == stop_at:
            raise KeyboardInterrupt
        return convert(self, name, merged)

    monkeypatch.setattr(LoraWriter, "convert", interrupted)
    check_and_fetch(merger)
    with pytest.raises(KeyboardInterrupt):
        merge_to_lora(merger, LoraOptions(RANK), restart=False)
    monkeypatch.setattr(LoraWriter, "convert", convert)
    done = json.load(open(tmp_path / "out" / ".lora-journal.json"))["done"]
    assert done and len(done) < len(merger.inputs.shards)
    merge_to_lora(merger, LoraOptions(RANK), restart=False)
    merger.close()
    for f in ("adapter_model.safetensors", "adapter_config.json", "lora_report.json"):
        assert open(tmp_path / "out" / f, "rb").read() == open(os.path.join(lora, f), "rb").read(), f
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "lora_report.json"]  # fmt: skip


def test_lora_flags_are_checked_before_any_work(toy_untied, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["merge", *flags(toy_untied), "--out", str(tmp_path / "o"), "--output-format", "lora"])
    assert r.exit_code == 2 and "--output-format lora needs --rank R" in r.output
    r = runner.invoke(main, ["merge", *flags(toy_untied), "--out", str(tmp_path / "o"), "--rank", "4"])
    assert r.exit_code == 2 and "--rank goes with --output-format lora" in r.output
    assert not os.path.exists(tmp_path / "o")


def test_embeddings_decomposed_on_request(outputs, toy_untied, tmp_path):
    """--embeddings lora: the embedding's update as PEFT's lora_embedding_A/B, lm_head as a linear."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    dense, _ = outputs
    r = CliRunner().invoke(main, ["merge", *flags(toy_untied), "--out", str(tmp_path / "l"), "--output-format", "lora",
                                  "--rank", str(RANK), "--embeddings", "lora", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    base = transformers.AutoModelForCausalLM.from_pretrained(f"{toy_untied}/base", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "l")).merge_and_unload().state_dict()
    want, w0 = load_all(dense), load_all(f"{toy_untied}/base")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        approx, _ = best_rank(want[name].double() - w0[name].double(), RANK)
        ref = w0[name].double() + approx
        assert (merged[name].double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), name


def test_an_energy_threshold_keeps_the_fewest_directions_that_reach_it(outputs, toy_untied, tmp_path):
    dense, _ = outputs
    r = CliRunner().invoke(main, ["merge", *flags(toy_untied), "--out", str(tmp_path / "e"), "--output-format", "lora",
                                  "--rank", "20", "--energy", "0.5", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.load(open(tmp_path / "e" / "lora_report.json"))
    config = json.load(open(tmp_path / "e" / "adapter_config.json"))
    want, w0 = load_all(dense), load_all(f"{toy_untied}/base")
    for name, row in report.items():
        s = torch.linalg.svdvals(want[name].double() - w0[name].double())
        share = (s**2).cumsum(0) / (s**2).sum()
        assert row["rank"] == int((share < 0.5).sum()) + 1 <= 20, name  # the fewest reaching half
        assert row["energy_kept"] >= 0.5
        module = name.rsplit(".", 1)[0]
        assert config["rank_pattern"].get(module, config["r"]) == row["rank"]
    peft = pytest.importorskip("peft")
    base = pytest.importorskip("transformers").AutoModelForCausalLM.from_pretrained(f"{toy_untied}/base",
                                                                                   dtype=torch.float32)  # fmt: skip
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "e")).merge_and_unload().state_dict()
    for name, row in report.items():  # PEFT reads each module's own rank from rank_pattern
        approx, _ = best_rank(want[name].double() - w0[name].double(), row["rank"])
        ref = w0[name].double() + approx
        assert (merged[name].double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), name
