"""`pytorch_model.bin` checkpoints (#25.5): read tensor by tensor without unpickling anything but a
tensor table, single and sharded, with the same checks and plan as safetensors; a merge of a
`.bin` expert equals the same merge of its safetensors copy byte for byte; anything a weights-only
reader would not load is refused with one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner

from streammerge.cli import main
from streammerge.errors import InputError
from streammerge.io.checkpoint import Checkpoint
from tests.conftest import experts_of, load_all


def as_bin(src: str, dst: str, shards: int = 1) -> str:
    """A copy of model folder `src` with its tensors in torch.save files (sharded with an index)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    tensors = load_all(src)
    names = list(tensors)
    if shards == 1:
        torch.save(dict(tensors), os.path.join(dst, "pytorch_model.bin"))
        return dst
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n] for n in part}, os.path.join(dst, fname))
        weight_map |= {n: fname for n in part}
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_tensors_read_exactly(toy_untied, tmp_path, shards):
    expert = experts_of(toy_untied)[0]
    ck = Checkpoint.open(as_bin(expert, str(tmp_path / "bin"), shards))
    want = load_all(expert)
    try:
        assert sorted(ck.names()) == sorted(want)
        for name, t in want.items():
            assert torch.equal(ck.get(name, dtype=None), t), name
            if t.dim() == 2 and t.shape[0] > 2:
                assert torch.equal(ck.get(name, dtype=torch.float32, rows=(1, 3)), t[1:3].float())
    finally:
        ck.close()


def test_merge_of_a_bin_expert_equals_the_merge_of_its_safetensors_copy(toy_untied, tmp_path):
    base, (e1, e2) = os.path.join(toy_untied, "base"), experts_of(toy_untied, 2)
    binned = as_bin(e1, str(tmp_path / "e1-bin"), shards=2)

    def merge(expert: str, out: str) -> dict[str, bytes]:
        r = CliRunner().invoke(main, ["merge", "--quiet", "--base", base, "--expert", expert, "--expert", e2,
                                      "--method", "ties", "--out", out])  # fmt: skip
        assert r.exit_code == 0, r.output
        return {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.startswith("model-")}

    assert merge(binned, str(tmp_path / "a")) == merge(e1, str(tmp_path / "b"))
    r = CliRunner().invoke(main, ["plan", "--base", base, "--expert", binned, "--expert", e2, "--method", "ties"])
    assert r.exit_code == 0 and "disk needed" in r.output, r.output


class Boom:
    def __reduce__(self):
        return (os.system, ("echo should-not-run > /dev/null",))


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda p: torch.save({"w": torch.zeros(2), "evil": Boom()}, p), "which a weights-only reader does not load"),
        (lambda p: torch.save({"w": torch.zeros(4, 4).t()}, p), "is not contiguous"),
        (lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False), "pre-1.6"),
        (lambda p: open(p, "wb").write(pickle.dumps({"w": 1})), "not a zip archive"),
    ],
    ids=["foreign_global", "view", "legacy_format", "plain_pickle"],
)
def test_what_a_weights_only_reader_would_not_load_is_refused(tmp_path, write, message):
    folder = tmp_path / "m"
    folder.mkdir()
    write(str(folder / "pytorch_model.bin"))
    with pytest.raises(InputError, match=message) as exc:
        Checkpoint.open(str(folder))
    assert len(str(exc.value).splitlines()) == 1 and str(folder / "pytorch_model.bin") in str(exc.value)


def test_a_transformers_state_dict_with_tied_weights(tmp_path):
    """What `torch.save(model.state_dict())` writes for a Llama with tied embeddings: lm_head and
    the embedding share one storage; both read back exactly, in bf16."""
    transformers = pytest.importorskip("transformers")
    shape = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=True)
    state = transformers.LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    (tmp_path / "m").mkdir()
    torch.save(state, str(tmp_path / "m" / "pytorch_model.bin"))
    ck = Checkpoint.open(str(tmp_path / "m"))
    try:
        assert sorted(ck.names()) == sorted(state)
        assert ck.info("lm_head.weight").offset == ck.info("model.embed_tokens.weight").offset
        for name, t in state.items():
            assert torch.equal(ck.get(name, dtype=None), t), name
    finally:
        ck.close()


def test_a_peft_adapter_saved_as_bin_merges_as_its_safetensors_copy(tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import make_toy

    toy = make_toy(str(tmp_path / "lora"), "--preset", "tiny", "--experts", "2", "--kind", "lora")
    base, (a1, a2) = os.path.join(toy, "base"), experts_of(toy, 2)
    binned = tmp_path / "a1-bin"
    shutil.copytree(a1, binned, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(os.path.join(a1, "adapter_model.safetensors")), str(binned / "adapter_model.bin"))

    def merge(adapter: str, out: str) -> dict[str, bytes]:
        r = CliRunner().invoke(main, ["merge", "--quiet", "--base", base, "--expert", adapter, "--expert", a2,
                                      "--method", "task_arithmetic", "--out", out])  # fmt: skip
        assert r.exit_code == 0, r.output
        return {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.startswith("model-")}

    assert merge(str(binned), str(tmp_path / "a")) == merge(a1, str(tmp_path / "b"))
