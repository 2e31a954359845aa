"""A merged toy model loads with transformers and runs a forward pass (test extra)."""

from __future__ import annotations

import os

import pytest
import torch

from streammerge import Expert, Recipe, merge
from tests.conftest import experts_of

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fixture", ["toy_untied", "toy_tied"])
def test_merged_model_loads_and_runs_forward(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    out = str(tmp_path / "merged")
    merge(
        Recipe(
            "ties",
            os.path.join(folder, "base"),
            tuple(Expert(p) for p in experts_of(folder)),
            out,
            {"density": 0.5},
            shard_size="40KB",
        ),
        device="cpu",
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"), torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w3 w4 w5 w17 w99", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        base_logits = base(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, base_logits)  # the merge changed the model
    # loaded weights are exactly the merged file's
    from tests.conftest import load_all

    merged = load_all(out)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t.float()), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
