"""A tokenizer as llama.cpp's converter (`convert_hf_to_gguf.py`) writes it into a GGUF file, by
the converter's own choice of path:

- `tokenizer.model` present: SentencePiece (`llama` model, pre-tokenizer `default`): every piece
  with its score and type, then `added_tokens.json` and tokenizer_config.json's
  `added_tokens_decoder`, padded to the config's vocab_size (`_create_vocab_sentencepiece`);
- else, for the `llama` architecture, a Llama-2-style `tokenizer.json` (BPE with byte fallback and a
  `Sequence` decoder): the same `llama` model from the fast tokenizer (gguf's LlamaHfVocab);
- else BPE (`gpt2` model): tokens and types from transformers' tokenizer, the merges, and the
  pre-tokenizer llama.cpp knows it by: the sha256 of one test string's token ids
  (`get_vocab_base`, `get_vocab_base_pre`; the table is streammerge/gguf_pre.py).

Special token ids, `add_bos`/`add_eos` and the chat template come from gguf's SpecialVocab, as there.
A tokenizer no path takes is refused with one line naming its file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, UsageError
from .io.checkpoint import load_json


@dataclass
class GgufVocab:
    model: str  # "gpt2" (BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list
    types: list[int]
    scores: list[float] | None
    load_merges: bool
    n_vocab: int | None  # SpecialVocab's bound on the special ids (SentencePiece paths)

    def add_to(self, w, gguf, folder: str, arch: str, config: dict) -> None:
        if arch == "llama":  # LlamaModel.set_vocab
            tokenizer_config = os.path.join(folder, "tokenizer_config.json")
            if os.path.isfile(tokenizer_config):
                prefix_space = load_json(tokenizer_config).get("add_prefix_space")  # type: ignore[union-attr]
                if prefix_space is not None:
                    w.add_add_space_prefix(prefix_space)
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        special = gguf.SpecialVocab(folder, load_merges=True) if self.load_merges else (
            gguf.SpecialVocab(folder, n_vocab=self.n_vocab))  # fmt: skip
        special.add_to_gguf(w)
        if arch == "llama" and config.get("vocab_size") == 49152:
            w.add_add_bos_token(False)  # the converter's rule for that vocabulary (Granite, SmolLM2)


def read_vocab(folder: str, arch: str, config: dict, gguf) -> GgufVocab:
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return _sentencepiece(folder, config)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no tokenizer.json or tokenizer.model; a GGUF file needs the tokenizer")
    if arch == "llama":
        try:
            hf = gguf.LlamaHfVocab(Path(folder))
        except (TypeError, FileNotFoundError):  # Llama 3 or another BPE: the gpt2 path
            pass
        else:
            tokens, scores, types = zip(*hf.all_tokens())
            return GgufVocab("llama", "default", list(tokens), [int(t) for t in types], list(scores), False,
                             len(tokens))  # fmt: skip
    model = load_json(path).get("model", {}).get("type")  # type: ignore[union-attr]
    if model != "BPE":
        raise InputError(f"{path}: a {model} tokenizer; the GGUF output writes BPE and SentencePiece tokenizers")
    return _bpe(folder, path, config, gguf)


def _transformers_tokenizer(folder: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError(
            "--output-format gguf needs transformers to read the tokenizer: pip install 'streammerge[gguf]'"
        ) from None
    return AutoTokenizer.from_pretrained(folder)


def _bpe(folder: str, path: str, config: dict, gguf) -> GgufVocab:
    from .gguf_pre import CHECK_TEXT, PRE_TOKENIZERS

    tok = _transformers_tokenizer(folder)
    digest = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise InputError(f"{path}: llama.cpp does not know this tokenizer's pre-tokenizer (check hash "
                         f"{digest[:16]}…); it cannot be written as GGUF")  # fmt: skip
    vocab_size = config.get("vocab_size", len(tok.vocab))
    reverse = {i: t for t, i in tok.vocab.items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp takes control and user tokens as normalised
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return GgufVocab("gpt2", pre, tokens, [int(t) for t in types], None, True, None)


# SentencePiece's token types as the GGUF file numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _sentencepiece(folder: str, config: dict) -> GgufVocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UsageError(
            f"{folder}/tokenizer.model: a SentencePiece tokenizer needs the sentencepiece package: pip install "
            "'streammerge[gguf]'"
        ) from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(os.path.join(folder, "tokenizer.model"))
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)  # fmt: skip
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path, encoding="utf-8") as f:
            for key, i in json.load(f).items():
                if i < vocab_size:
                    tokens[i], scores[i], types[i] = key.encode(), -1000.0, USER_DEFINED
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        decoder = load_json(config_path).get("added_tokens_decoder", {})  # type: ignore[union-attr]
        for key, data in decoder.items():
            i, token = int(key), data["content"]
            if i >= vocab_size:
                continue
            if data.get("special") or looks_special(token):
                types[i] = CONTROL
            else:
                token = token.replace("\u2581", " ")
                types[i] = USER_DEFINED
            scores[i], tokens[i] = -1000.0, token.encode()
    return GgufVocab("llama", "default", tokens, types, scores, False, len(tokens))


def looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models leave unmarked."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )
