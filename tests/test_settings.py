"""Gradients and filters (settings.py) follow mergekit 0.1.5's evaluate_setting, and reach the
merge per tensor: a native recipe with a density gradient equals per-layer merges."""

from __future__ import annotations

import os

import pytest
import torch

from streammerge import Expert, Recipe, merge
from streammerge import settings
from streammerge.errors import UsageError
from tests.conftest import experts_of, load_all


def test_evaluate_follows_mergekit():
    assert settings.evaluate(0.3, "x", 0.7) == 0.3
    assert settings.evaluate([0.2, 0.8], "x", 0.5) == pytest.approx(0.5)
    assert settings.evaluate([0.2, 0.5, 0.8], "x", 0.75) == pytest.approx(0.65)  # between entries 1 and 2
    assert settings.evaluate([0.2, 0.5, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert settings.evaluate([True, False], "x", 0.49) is True  # non-numbers pick ⌊t·(n−1)⌋
    filters = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]
    assert settings.evaluate(filters, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.1
    assert settings.evaluate(filters, "model.layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert settings.evaluate(filters, "model.norm.weight", 0.0) is None  # not set here: the next level applies
    assert settings.evaluate(filters + [{"value": 7}], "model.norm.weight", 0.0) == 7
    assert settings.resolve([filters, 0.9], "lm_head.weight", 0.0) == 0.9


def test_layer_fraction():
    assert settings.layer_fraction("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert settings.layer_fraction("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert settings.layer_fraction("model.embed_tokens.weight", 4) == 0.0
    assert settings.layer_fraction("lm_head.weight", 4) == 0.0  # mergekit: t = 0 outside the layers
    assert settings.layer_fraction("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert settings.count_layers(["model.layers.0.a", "model.layers.11.b", "lm_head.weight"]) == 12


@pytest.mark.parametrize(
    "bad,match",
    [
        ([0.2, [1, 2]], "mixing values and filters"),
        ([{"filter": 3, "value": 1}], "filter 3 is not a string"),
        ([{"value": {"a": 1}}], "a scalar or a gradient"),
        ([], "an empty list"),
        ({"filter": "mlp"}, "mixing values and filters"),
    ],
)
def test_malformed_settings_are_refused_by_name(bad, match, toy_untied, tmp_path):
    recipe = Recipe(
        "ties",
        os.path.join(toy_untied, "base"),
        tuple(Expert(p) for p in experts_of(toy_untied)),
        str(tmp_path / "o"),
        {"density": bad},
    )
    with pytest.raises(UsageError, match=f"parameter density: .*{match}"):
        recipe.validate()


def test_density_gradient_equals_per_layer_merges(toy_untied, tmp_path):
    """A gradient over the 2 toy layers (t = 0 and 1) and a filter give, tensor by tensor,
    what a constant setting gives."""
    base = os.path.join(toy_untied, "base")
    experts = tuple(Expert(p, 0.7) for p in experts_of(toy_untied))
    grad = {"density": [{"filter": "mlp", "value": 0.9}, {"value": [0.2, 0.6]}]}
    merge(Recipe("ties", base, experts, str(tmp_path / "g"), grad), device="cpu")
    got = load_all(str(tmp_path / "g"))
    for density in (0.2, 0.6, 0.9):
        merge(Recipe("ties", base, experts, str(tmp_path / f"c{density}"), {"density": density}), device="cpu")
    const = {d: load_all(str(tmp_path / f"c{d}")) for d in (0.2, 0.6, 0.9)}
    for name, t in got.items():
        want = 0.9 if "mlp" in name else (0.6 if ".layers.1." in name else 0.2)
        assert torch.equal(t, const[want][name]), name


def test_orthomerge_takes_filtered_parameters(toy_untied, tmp_path):
    """A filter on an OrthoMerge parameter: o_proj merged with max_angle_deg 1e-3 (every plane
    reset: the residual alone), the rest with the default — as two constant-setting merges give."""
    base = os.path.join(toy_untied, "base")
    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    common = {"target": "global"}
    merge(
        Recipe(
            "orthomerge",
            base,
            experts,
            str(tmp_path / "f"),
            common | {"max_angle_deg": [{"filter": "o_proj", "value": 1e-3}, {"value": 90.0}]},
        ),
        device="cpu",
    )
    merge(Recipe("orthomerge", base, experts, str(tmp_path / "zero"), common | {"max_angle_deg": 1e-3}), device="cpu")
    merge(Recipe("orthomerge", base, experts, str(tmp_path / "default"), common), device="cpu")
    got, zero, default = (load_all(str(tmp_path / d)) for d in ("f", "zero", "default"))
    for name, t in got.items():
        assert torch.equal(t, (zero if "o_proj" in name else default)[name]), name
    assert not torch.equal(
        zero["model.layers.0.self_attn.o_proj.weight"], default["model.layers.0.self_attn.o_proj.weight"]
    )
