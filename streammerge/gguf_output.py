"""A merge written straight to one GGUF file (llama.cpp, Ollama, LM Studio): no safetensors copy on
disk, no converter run after it. The file holds what llama.cpp's own converter
(`convert_hf_to_gguf.py`) would write for the dense output folder: the same tensor names, types and
bytes, the same hyper-parameters and tokenizer; tests/test_gguf_output.py compares the two.

What it follows from the converter, per tensor, in the base's order:
- the merged tensor as the dense output would store it (its output dtype), then float32 unless it
  is float16, as the converter reads it;
- Llama-family q/k projections (`llama` architecture: Llama, Mistral) have their rows reordered for
  llama.cpp's rotary embedding (`permute`: per head, the two halves interleaved);
- the type: float32 for 1-D tensors, norms and biases; else `--gguf-type` (Q8_0 falls back to F16
  where a row is not a multiple of 32 values);
- Llama 3's rope scaling becomes a generated `rope_freqs.weight`, as the converter computes it.

Supported (anything else is refused up front, with one line): architectures LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM; rope scaling none, linear, yarn or llama3; SentencePiece
tokenizers and BPE ones whose pre-tokenizer llama.cpp knows (streammerge/gguf_vocab.py). Needs the
`gguf` extra (the `gguf` package, sentencepiece, and transformers, which reads tokenizers as the
converter does).

Resumable: the file is written to OUT.partial, its progress made durable every few seconds in
OUT.streammerge.json; rerunning the command continues from the last durable tensor, and the file
appears under its name only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError, ResumeError, UsageError
from .gguf_vocab import read_vocab
from .io.checkpoint import load_json

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
PERMUTED = {"llama"}  # the converter's `undo_permute`
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ALIGNMENT = 32  # GGUF's default data alignment


def gguf_module():
    try:
        import logging

        import gguf

        logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file plan at INFO
    except ImportError:
        raise UsageError("--output-format gguf needs the gguf package: pip install 'streammerge[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class GgufTensor:
    source: str | None  # the merged tensor's name; None: generated (rope_freqs)
    name: str
    shape: tuple[int, ...]  # as torch and numpy have it (GGUF lists it reversed)
    qtype: int  # gguf.GGMLQuantizationType
    nbytes: int
    offset: int  # from the start of the file


def default_type(dtypes: set[str]) -> str:
    """The input's float type: bf16, f16 or f32 (the widest present)."""
    return "f32" if "F32" in dtypes or "F64" in dtypes else "bf16" if "BF16" in dtypes else "f16"


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's order of a q/k projection's rows: per head, the rotary halves interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_parameters(config: dict) -> dict:
    """transformers 5 writes `rope_parameters`, earlier versions `rope_scaling` and `rope_theta`."""
    params = dict(config.get("rope_scaling") or {})
    params |= config.get("rope_parameters") or {}
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def llama3_rope_factors(config: dict, rope: dict) -> torch.Tensor:
    """The converter's `rope_freqs` for Llama 3's rope scaling (conversion/llama.py)."""
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


class GgufLayout:
    """Everything the file will hold, decided and checked before any work: its metadata, and every
    tensor's name, type, size and offset."""

    def __init__(self, inputs, out: str, gguf_type: str | None):
        gguf = gguf_module()
        self.gguf, self.inputs, self.out = gguf, inputs, out
        recipe = inputs.recipe
        if not out.endswith(".gguf"):
            raise UsageError(f"--out {out}: --output-format gguf writes one file; give a name ending in .gguf")
        if recipe.slices is not None:
            raise UsageError("--output-format gguf: layer slices (passthrough stacking) are not supported; merge dense")
        folder = inputs.base.folder
        config_path = os.path.join(folder, "config.json")
        config = load_json(config_path) if os.path.isfile(config_path) else None
        if not isinstance(config, dict):
            raise InputError(f"{config_path}: missing or not a JSON object; a GGUF needs the model's hyper-parameters")
        arch_name = (config.get("architectures") or [None])[0]
        if arch_name not in ARCHITECTURES:
            raise InputError(f"{config_path}: architecture {arch_name!r} cannot be written as GGUF here (supported: "
                             f"{', '.join(ARCHITECTURES)})")  # fmt: skip
        self.config, self.arch = config, ARCHITECTURES[arch_name]
        self.rope = rope_parameters(config)
        rope_type = str(self.rope.get("rope_type") or "default").lower()
        if rope_type not in ("default", "linear", "yarn", "llama3"):
            raise InputError(f"{config_path}: rope scaling {rope_type!r} cannot be written as GGUF here")
        dtypes = {t.dtype for s in inputs.shards for t in s.tensors if t.merged}
        self.gguf_type = gguf_type or default_type(dtypes)
        q = gguf.GGMLQuantizationType
        ft = gguf.LlamaFileType
        self.file_type = {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16,
                          "q8_0": ft.MOSTLY_Q8_0}[self.gguf_type]  # fmt: skip
        main_type = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[self.gguf_type]
        self.tokenizer_folder = self._tokenizer_folder()
        self.vocab = read_vocab(
            self.tokenizer_folder, self.arch, config, gguf
        )  # refused here if llama.cpp would not know it
        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, self.arch.upper()), config["num_hidden_layers"])
        specs: list[tuple[str | None, str, tuple[int, ...], int]] = []
        if rope_type == "llama3":
            n = len(llama3_rope_factors(config, self.rope))
            specs.append((None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (n,), q.F32))
        for t in (t for s in inputs.shards for t in s.tensors):
            new = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise InputError(f"{inputs.base.file_of(t.name)}: tensor {t.name!r} has no GGUF name for {self.arch}")
            if len(t.shape) <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight"):
                qtype = q.F32
            elif main_type == q.Q8_0 and t.shape[-1] % 32:
                qtype = q.F16  # the converter's fallback where Q8_0's 32-value blocks do not fit a row
            else:
                qtype = main_type
            specs.append((t.name, new, tuple(t.shape), qtype))
        sized = [(*spec, math.prod(gguf.quant_shape_to_byte_shape(spec[2], spec[3]))) for spec in specs]
        self.prefix = self._prefix(sized)
        offset = self.data_start = -(-len(self.prefix) // ALIGNMENT) * ALIGNMENT
        self.tensors: list[GgufTensor] = []
        for source, name, shape, qtype, nbytes in sized:
            self.tensors.append(GgufTensor(source, name, shape, int(qtype), nbytes, offset))
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        self.size = offset

    def _tokenizer_folder(self) -> str:
        from .output_files import tokenizer_donor

        donor = tokenizer_donor(self.inputs.recipe)
        return donor if donor else self.inputs.base.folder

    def _prefix(self, specs) -> bytes:
        """The header, metadata and tensor table, as gguf's writer lays them out."""
        import tempfile

        gguf, config = self.gguf, self.config
        fd, tmp = tempfile.mkstemp(suffix=".gguf")  # gguf's writer wants a path; nothing goes near --out yet
        os.close(fd)
        w = gguf.GGUFWriter(tmp, self.arch)
        try:
            w.add_type("model")
            w.add_name(os.path.basename(self.out)[: -len(".gguf")])
            w.add_block_count(config["num_hidden_layers"])
            for key, add in (("max_position_embeddings", w.add_context_length), ("hidden_size", w.add_embedding_length),
                             ("intermediate_size", w.add_feed_forward_length),
                             ("num_attention_heads", w.add_head_count),
                             ("num_key_value_heads", w.add_head_count_kv)):  # fmt: skip
                if config.get(key) is not None:
                    add(config[key])
            rope, rope_type = self.rope, str(self.rope.get("rope_type") or "default").lower()
            if rope_type == "linear" and rope.get("factor") is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(rope["factor"])
            elif rope_type == "yarn" and rope.get("factor") is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                w.add_rope_scaling_factor(rope["factor"])
                w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if rope.get("rope_theta") is not None:
                w.add_rope_freq_base(rope["rope_theta"])
            if config.get("rms_norm_eps") is not None:
                w.add_layer_norm_rms_eps(config["rms_norm_eps"])
            if config.get("head_dim") is not None:
                w.add_key_length(config["head_dim"])
                w.add_value_length(config["head_dim"])
            w.add_file_type(self.file_type)
            w.add_vocab_size(config["vocab_size"])
            w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
            self.vocab.add_to(w, gguf, self.tokenizer_folder, self.arch, config)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for _, name, shape, qtype, nbytes in specs:
                w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType(qtype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            with open(tmp, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def encode(self, t: GgufTensor, merged: torch.Tensor | None) -> bytes:
        """One tensor's bytes in the file: as the converter reads, reorders and quantizes it."""
        if t.source is None:
            data = llama3_rope_factors(self.config, self.rope)
        else:
            assert merged is not None
            data = merged if merged.dtype in (torch.float16, torch.float32) else merged.to(torch.float32)
            if self.arch in PERMUTED and t.source.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, self.config["num_attention_heads"], self.config["num_attention_heads"])
            elif self.arch in PERMUTED and t.source.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, self.config["num_attention_heads"], self.config.get("num_key_value_heads"))
        out = self.gguf.quants.quantize(data.contiguous().numpy(), self.gguf.GGMLQuantizationType(t.qtype))
        raw = out.tobytes()
        if len(raw) != t.nbytes:
            raise AssertionError(f"{t.name}: {len(raw)} bytes, the layout says {t.nbytes}")
        return raw


def merge_to_gguf(merger, gguf_type: str | None, restart: bool, checkpoint_seconds: float, quiet: bool) -> str:
    """Run the merge `merger` plans into the GGUF file named by the recipe's `out` (resumed from
    OUT.partial where an earlier run of the same merge left it)."""
    import time

    from .engine.output import fingerprint
    from .engine.shards import Progress
    from .io.atomic import fsync_folder, write_bytes_atomic
    from .io.lock import exclusive_file

    inputs = merger.inputs
    out = os.path.abspath(inputs.recipe.out)
    if inputs.method.whole_model_statistics(inputs.params):
        raise UsageError(f"{inputs.method.name} with statistics over the whole model: --output-format gguf "
                         "merges per tensor; use per-tensor settings or the dense output")  # fmt: skip
    layout = GgufLayout(inputs, out, gguf_type)  # every check, before anything is written
    merger.plan.check_memory()
    merger.download_inputs()
    digest = hashlib.sha256(f"{fingerprint(inputs, merger.device.type)[0]} {layout.gguf_type}".encode()).hexdigest()
    partial, journal_path = out + ".partial", out + ".streammerge.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lock_path = out + ".streammerge.lock"
    with open(lock_path, "a") as lock, exclusive_file(lock, partial):
        state = load_json(journal_path) if os.path.exists(journal_path) else None
        if state is not None and state.get("fingerprint") != digest:
            if not restart:
                raise ResumeError(f"{partial}: a GGUF merge of other inputs or options; pass --restart to start over")
            state = None
        done, offset = (state["tensors"], state["offset"]) if state and os.path.exists(partial) else (0, 0)
        mode = "r+b" if done else "wb"
        with open(partial, mode) as f:
            if done:
                f.truncate(offset)
                f.seek(offset)
            else:
                f.write(layout.prefix + bytes(layout.data_start - len(layout.prefix)))
            total = sum(t.nbytes for t in layout.tensors)
            progress = Progress(total, sum(t.nbytes for t in layout.tensors[:done]), "merging to GGUF", quiet)
            computer, by_name = merger.computer(), {t.name: t for s in inputs.shards for t in s.tensors}
            last = time.monotonic()
            try:
                for i, t in enumerate(layout.tensors[done:], start=done):
                    merged = computer.merge(by_name[t.source], None) if t.source is not None else None
                    raw = layout.encode(t, merged)
                    assert f.tell() == t.offset, (t.name, f.tell(), t.offset)
                    f.write(raw + bytes(-len(raw) % ALIGNMENT))
                    progress.done(t.nbytes, t.nbytes)
                    if time.monotonic() - last >= checkpoint_seconds or i == len(layout.tensors) - 1:
                        f.flush()
                        os.fsync(f.fileno())
                        record = {"fingerprint": digest, "tensors": i + 1, "offset": f.tell()}
                        write_bytes_atomic(journal_path, json.dumps(record).encode())
                        last = time.monotonic()
            finally:
                progress.close()
        os.replace(partial, out)
        fsync_folder(os.path.dirname(out))
        os.remove(journal_path)
        os.remove(lock_path)
    return out


def verify_gguf(path: str) -> str:
    """A finished GGUF: its structure parsed (every tensor within the file), the metadata llama.cpp
    needs present, every tensor finite once dequantized; a partial one is named as such."""
    gguf = gguf_module()
    if os.path.exists(path + ".streammerge.json"):
        raise InputError(f"{path}: an unfinished merge's record is beside it; rerun the merge to finish it")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a valid GGUF file ({exc})") from None
    arch = reader.fields.get("general.architecture")
    problems = [] if arch is not None else [f"{path}: no general.architecture"]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in reader.fields:
            problems.append(f"{path}: no {key}")
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if not np.isfinite(values).all():
            problems.append(f"{path}: tensor {t.name!r} has NaN or Inf")
    if problems:
        raise InputError(f"{path}: verification failed: {len(problems)} problems\n  " + "\n  ".join(problems))
    return f"{path}: OK ({arch.contents()}, {len(reader.tensors)} tensors, {os.path.getsize(path) / 1e9:.2f} GB)"
