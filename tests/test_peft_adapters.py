"""PEFT adapters as experts, cross-checked against PEFT itself (test extra) and old formats.

One adapter merged with `linear` gives that adapter's dense weights, which must equal what
`merge_and_unload()` of the installed PEFT produces. Older OFT formats (PEFT ≤ 0.15) are
written by hand here and checked against the formulas of those PEFT versions' merge code.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from click.testing import CliRunner

from streammerge import Expert, Recipe, merge
from streammerge.cli import main as cli_main
from streammerge.errors import InputError
from tests.conftest import load_all, make_toy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def f32_toy(tmp_path_factory) -> str:
    return make_toy(
        str(tmp_path_factory.mktemp("f32toy")),
        "--preset",
        "tiny",
        "--experts",
        "1",
        "--dtype",
        "float32",
        "--shard-size",
        "80KB",
    )


def peft_adapter(base: str, folder: str, config) -> dict[str, torch.Tensor]:
    """Save a randomly initialised PEFT adapter; return PEFT's merged dense state dict."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, config)
    pm.save_pretrained(folder)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def dense_from(base: str, adapter: str, out: str, method: str = "linear", **params) -> dict[str, torch.Tensor]:
    merge(Recipe(method, base, (Expert(adapter),), out, params, dtype="float32"), device="cpu")
    return load_all(out)


def assert_matches_peft(ours: dict, theirs: dict, atol: float = 2e-6) -> int:
    changed = 0
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], atol=atol, rtol=1e-5, msg=name)
    return changed


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_adapter_dense_weights_equal_peft_merge_and_unload(neumann, f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    cfg = peft.OFTConfig(
        oft_block_size=16,
        r=0,
        target_modules=["q_proj", "k_proj", "down_proj", "gate_proj"],
        init_weights=False,
        use_cayley_neumann=neumann,
    )
    theirs = peft_adapter(base, str(tmp_path / "oft"), cfg)
    ours = dense_from(base, str(tmp_path / "oft"), str(tmp_path / "out"))
    assert_matches_peft(ours, theirs)
    base_w = load_all(base)
    assert not torch.allclose(
        ours["model.layers.0.mlp.down_proj.weight"], base_w["model.layers.0.mlp.down_proj.weight"]
    )


def test_oft_embedding_and_block_share_equal_peft(f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    cfg = peft.OFTConfig(
        oft_block_size=16, r=0, target_modules=["embed_tokens", "v_proj"], init_weights=False, use_cayley_neumann=False
    )
    theirs = peft_adapter(base, str(tmp_path / "emb"), cfg)
    assert_matches_peft(dense_from(base, str(tmp_path / "emb"), str(tmp_path / "o1")), theirs)
    cfg = peft.OFTConfig(
        oft_block_size=0,
        r=4,
        target_modules=["q_proj", "up_proj"],
        block_share=True,
        init_weights=False,
        use_cayley_neumann=True,
    )
    theirs = peft_adapter(base, str(tmp_path / "share"), cfg)
    assert_matches_peft(dense_from(base, str(tmp_path / "share"), str(tmp_path / "o2")), theirs)


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns", "dora"])
def test_lora_adapter_dense_weights_equal_peft(variant, f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    if variant == "rslora_patterns":
        kw |= dict(use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
        kw["target_modules"] = kw["target_modules"] + ["embed_tokens"]
    if variant == "dora":
        kw |= dict(use_dora=True)
    theirs = peft_adapter(base, str(tmp_path / "lora"), peft.LoraConfig(**kw))
    assert_matches_peft(dense_from(base, str(tmp_path / "lora"), str(tmp_path / "out")), theirs)


def old_oft_adapter(folder: str, base: dict, version: str, block: int, seed: int) -> dict[str, torch.Tensor]:
    """Write a PEFT 0.13 (output side) or 0.15 (input side + oft_s) adapter; return the expected
    dense weights computed with those versions' merge formulas."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        w = base[name]
        key = "base_model.model." + name[: -len(".weight")]
        width = w.shape[0] if version == "0.13" else w.shape[1]
        blocks = math.ceil(width / block)
        a = 0.1 * torch.randn(blocks, block, block, generator=g)
        s = 0.5 * (a - a.transpose(1, 2))
        eye = torch.eye(block).expand(blocks, block, block)
        r = torch.bmm(eye - s, torch.inverse(eye + s))  # (I − S)(I + S)⁻¹ in both versions
        rbd = torch.block_diag(*r)
        tensors[key + ".oft_r"] = a
        if version == "0.13":
            expected[name] = (w.T @ rbd[: w.shape[0], : w.shape[0]]).T  # new = Wᵀ·R, output side
        else:
            scale = 1.0 + 0.1 * torch.randn(w.shape[0], 1, generator=g)
            tensors[key + ".oft_s"] = scale
            expected[name] = (rbd @ w.T).T * scale
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "OFT", "r": 4, "target_modules": ["q_proj", "up_proj"]}, f)
    return expected


@pytest.mark.parametrize("version", ["0.13", "0.15"])
def test_old_oft_formats_apply_as_their_peft_version_did(version, f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    base_w = load_all(base)
    expected = old_oft_adapter(str(tmp_path / "old"), base_w, version, 16, 1)
    ours = dense_from(base, str(tmp_path / "old"), str(tmp_path / "out"))
    for name, want in expected.items():
        torch.testing.assert_close(ours[name], want, atol=2e-6, rtol=1e-5)
    untouched = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ours[untouched], base_w[untouched])


def test_orthomerge_of_oft_adapters_merges_generators_with_peft_convention(f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    folders = []
    for i, neumann in enumerate([False, False, False]):
        torch.manual_seed(i + 10)
        cfg = peft.OFTConfig(
            oft_block_size=16,
            r=0,
            target_modules=["q_proj", "down_proj"],
            init_weights=False,
            use_cayley_neumann=neumann,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.get_peft_model(model, cfg)
        pm.save_pretrained(str(tmp_path / f"e{i}"))
        folders.append(str(tmp_path / f"e{i}"))
    out = str(tmp_path / "merged")
    merge(Recipe("orthomerge", base, tuple(Expert(f) for f in folders), out, {}, dtype="float32"), device="cpu")
    got = load_all(out)
    # by hand: Q* = mean‖Q_i‖ · ΣQ_i/‖ΣQ_i‖ on the whole block-diagonal generator; R = (I − Q*)(I + Q*)⁻¹
    from safetensors import safe_open

    name = "model.layers.1.mlp.down_proj"
    qs = []
    for f in folders:
        with safe_open(os.path.join(f, "adapter_model.safetensors"), "pt") as sf:
            packed = sf.get_tensor(f"base_model.model.{name}.oft_R.weight")
        b = 16
        rows, cols = torch.triu_indices(b, b, 1)
        q = torch.zeros(packed.shape[0], b, b)
        q[:, rows, cols] = packed
        qs.append(q - q.transpose(1, 2))
    total = sum(qs)
    q_star = total * (sum(float(q.norm()) for q in qs) / len(qs) / float(total.norm()))
    eye = torch.eye(16).expand_as(q_star)
    r = torch.linalg.solve(eye + q_star, eye - q_star, left=False)
    w = load_all(base)[name + ".weight"]
    torch.testing.assert_close(got[name + ".weight"], w @ torch.block_diag(*r).T, atol=2e-6, rtol=1e-5)
    assert torch.equal(
        got["model.layers.0.input_layernorm.weight"], load_all(base)["model.layers.0.input_layernorm.weight"]
    )
    # --report says how far the merged rotation moves from I, beside each expert's
    from streammerge.engine import Merge, RunOptions

    report = str(tmp_path / "report.json")
    merger = Merge(
        Recipe("orthomerge", base, tuple(Expert(f) for f in folders), str(tmp_path / "reported"), {}),
        RunOptions(device="cpu", quiet=True, report=report),
    )
    try:
        merger.run()
    finally:
        merger.close()
    rec = json.load(open(report))["tensors"][name + ".weight"]
    assert rec["rotation_distance"] == pytest.approx(float((r - eye).norm()), rel=1e-5)
    assert rec["merged_generator_norm"] == pytest.approx(float(q_star.norm()), rel=1e-5)
    assert rec["generator_norms"] == pytest.approx([float(q.norm()) for q in qs], rel=1e-5)
    r_i = [torch.linalg.solve(eye + q, eye - q, left=False) for q in qs]
    assert rec["expert_rotation_distances"] == pytest.approx([float((x - eye).norm()) for x in r_i], rel=1e-5)
    summary = CliRunner().invoke(cli_main, ["report", report])
    assert summary.exit_code == 0 and "‖R* − I‖ / mean ‖R_i − I‖" in summary.output, summary.output
    # the plan counts no second solve for the generators (merge_oft solves none), on two threads
    planner = Merge(
        Recipe("orthomerge", base, tuple(Expert(f) for f in folders), str(tmp_path / "planned"), {}),
        RunOptions(device="cpu", quiet=True, threads=2),
    )
    try:
        rotated = [t for t in planner.plan.tensors if t.name == name + ".weight"]
        assert rotated and not any(t.side_by_side for t in planner.plan.tensors)
    finally:
        planner.close()
    # merging copies of one adapter gives that adapter
    out2 = str(tmp_path / "copies")
    merge(Recipe("orthomerge", base, (Expert(folders[0]),) * 3, out2, {}, dtype="float32"), device="cpu")
    single = dense_from(base, folders[0], str(tmp_path / "single"))
    for k, v in load_all(out2).items():
        torch.testing.assert_close(v, single[k], atol=2e-6, rtol=1e-5)


def test_mixed_oft_conventions_and_bad_block_sizes_are_refused(f32_toy, tmp_path):
    base = os.path.join(f32_toy, "base")
    for i, neumann in enumerate([True, False]):
        cfg = peft.OFTConfig(
            oft_block_size=16, r=0, target_modules=["q_proj"], init_weights=False, use_cayley_neumann=neumann
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft.get_peft_model(model, cfg).save_pretrained(str(tmp_path / f"c{i}"))
    with pytest.raises(InputError, match="convention"):
        merge(
            Recipe(
                "orthomerge",
                base,
                (Expert(str(tmp_path / "c0")), Expert(str(tmp_path / "c1"))),
                str(tmp_path / "o"),
                {},
            ),
            device="cpu",
        )
    assert not os.path.exists(tmp_path / "o" / "model.safetensors.index.json")
    # weight-space methods may mix them: each adapter is applied with its own convention
    merge(
        Recipe(
            "task_arithmetic",
            base,
            (Expert(str(tmp_path / "c0")), Expert(str(tmp_path / "c1"))),
            str(tmp_path / "ta"),
            {},
        ),
        device="cpu",
    )
    # 14 blocks of 5 cannot cover a width of 64
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight": torch.zeros(14, 10)},
        str(bad / "adapter_model.safetensors"),
    )
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    with pytest.raises(InputError, match="block size must divide"):
        merge(Recipe("linear", base, (Expert(str(bad)),), str(tmp_path / "o2"), {}), device="cpu")


@pytest.mark.parametrize("neumann", [True, False])
def test_merged_oft_adapter_loads_in_peft_and_equals_dense_orthomerge(neumann, f32_toy, tmp_path):
    from streammerge.adapter_output import merge_to_adapter

    base = os.path.join(f32_toy, "base")
    folders = []
    for i in range(3):
        torch.manual_seed(20 + i)
        cfg = peft.OFTConfig(
            oft_block_size=16,
            r=0,
            target_modules=["q_proj", "down_proj", "embed_tokens"],
            init_weights=False,
            use_cayley_neumann=neumann,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft.get_peft_model(model, cfg).save_pretrained(str(tmp_path / f"e{i}"))
        folders.append(str(tmp_path / f"e{i}"))
    recipe = Recipe(
        "orthomerge", base, tuple(Expert(f) for f in folders), str(tmp_path / "adapter"), {}, dtype="float32"
    )
    merge_to_adapter(recipe)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload()
    dense = str(tmp_path / "dense")
    merge(Recipe("orthomerge", base, tuple(Expert(f) for f in folders), dense, {}, dtype="float32"), device="cpu")
    state = loaded.state_dict()
    for k, v in load_all(dense).items():
        torch.testing.assert_close(state[k], v, atol=2e-6, rtol=1e-5, msg=k)


def test_peft_016_neumann_adapters_use_that_versions_coefficients(f32_toy, tmp_path):
    """The same stored generator means a different rotation under PEFT 0.16–0.17's series."""
    from safetensors import safe_open

    base = os.path.join(f32_toy, "base")
    cfg = peft.OFTConfig(oft_block_size=16, r=0, target_modules=["o_proj"], init_weights=False, use_cayley_neumann=True)
    peft_adapter(base, str(tmp_path / "a"), cfg)
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    config["peft_version"] = "0.16.0"
    json.dump(config, open(tmp_path / "a" / "adapter_config.json", "w"))
    ours = dense_from(base, str(tmp_path / "a"), str(tmp_path / "out"))
    name = "model.layers.0.self_attn.o_proj"
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as sf:
        packed = sf.get_tensor(f"base_model.model.{name}.oft_R.weight")
    rows, cols = torch.triu_indices(16, 16, 1)
    q = torch.zeros(packed.shape[0], 16, 16)
    q[:, rows, cols] = packed
    q = q - q.transpose(1, 2)
    eye = torch.eye(16).expand_as(q)
    r = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + 2 * q @ q @ q @ q  # 0.16–0.17: every power weight 2
    w = load_all(base)[name + ".weight"]
    torch.testing.assert_close(ours[name + ".weight"], w @ torch.block_diag(*r).T, atol=2e-6, rtol=1e-5)
