#!/usr/bin/env python3
"""Header-only model folders with real model shapes, for planning at full scale at no cost.

    python tools/make_shape_fixture.py OUT --shape llama-3.1-8b --experts 5

writes OUT/base and OUT/expert-1 ... OUT/expert-N: sharded safetensors whose headers describe
every tensor of the model (bf16) and whose data sections are holes (sparse files: the files
have their full size but use no disk), plus config.json. `streammerge plan` reads only
headers, so it plans a 5 × 8B merge from these in a second; merging them would read zeros.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge.io.safetensors_format import build_header, itemsize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_toy_models import llama_layout  # noqa: E402

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv_heads, vocab (tied embeddings: no)
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128256),
}
SHARD_BYTES = 5 * 10**9


def layout(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes in the order Hugging Face writes them (untied, no biases)."""
    return llama_layout(hidden, inter, layers, heads, kv, vocab, tied=False, bias=False)


def write_sparse_model(folder: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16") -> None:
    os.makedirs(folder, exist_ok=True)
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, _ = build_header(group, {"format": "pt"})
        data = sum(math.prod(s) * itemsize(d) for _, d, s in group)
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)  # a hole: full size, no disk
        weight_map.update({n: fname for n, _, _ in group})
    total = sum(math.prod(s) * itemsize(dtype) for _, s in tensors)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--experts", type=int, default=5)
    args = ap.parse_args(argv)
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    tensors = layout(hidden, inter, layers, heads, kv, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for name in ["base"] + [f"expert-{i}" for i in range(1, args.experts + 1)]:
        folder = os.path.join(args.out, name)
        write_sparse_model(folder, tensors)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    params = sum(math.prod(s) for _, s in tensors)
    print(
        f"wrote {args.out}: base + {args.experts} experts shaped like {args.shape} ({params / 1e9:.2f} B parameters "
        "each, header only)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
