#!/usr/bin/env python3
"""Deterministic synthetic Llama-shaped models for tests, the demo and benchmarks.

    python tools/make_toy_models.py OUT --preset tiny --experts 3 --kind full

writes OUT/base (config.json, sharded safetensors + index, a tiny word-level tokenizer) and
OUT/expert-1 ... OUT/expert-N derived from it: `full` adds a dense delta to every float
tensor, `lowrank` a rank-r delta to every 2-D weight (as a merged LoRA would) and a small
dense one to 1-D tensors; `lora` and `oft` write PEFT adapter folders (adapter_config.json +
adapter_model.safetensors, PEFT ≥ 0.16 key layout) targeting the attention and MLP projections.
Every tensor is drawn from a generator seeded by (seed, model, name),
so the same flags always give byte-identical files. Tensors are written one at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge.io.atomic import ShardWriter  # noqa: E402
from streammerge.io.safetensors_format import DTYPE_NAMES  # noqa: E402
from streammerge.units import parse_size  # noqa: E402

PRESETS = {
    # name: hidden, intermediate, layers, heads, kv_heads, vocab
    "tiny": (64, 160, 2, 4, 2, 256),
    "small": (256, 704, 4, 8, 2, 2048),
    "deep": (512, 1408, 48, 8, 2, 4096),  # many mid-sized tensors: inputs much larger than any working set
    "0.5b": (1024, 4096, 28, 16, 4, 32000),
    "1.5b": (2048, 5632, 28, 16, 4, 32000),
    "0.5b-128k": (768, 3072, 32, 12, 4, 128256),  # a Llama-3 vocabulary: embedding and lm_head dominate
    "8b-slice": (4096, 14336, 2, 32, 8, 128256),  # Llama-3.1-8B's embedding, lm_head and two of its layers
}


def generator(*key: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(
        int.from_bytes(hashlib.sha256("\x00".join(map(str, key)).encode()).digest()[:8], "little") & (2**63 - 1)
    )
    return g


def llama_layout(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, bias: bool
) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
        ]
        if bias:
            out += [
                (p + "self_attn.q_proj.bias", (heads * head_dim,)),
                (p + "self_attn.k_proj.bias", (kv * head_dim,)),
                (p + "self_attn.v_proj.bias", (kv * head_dim,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = generator(seed, "base", name)
    if len(shape) == 1:
        if name.endswith("bias"):
            return torch.randn(shape, generator=g) * 0.02
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(shape[1])
    return torch.randn(shape, generator=g) * std


def expert_delta(
    name: str, base: torch.Tensor, seed: int, expert: int, kind: str, scale: float, rank: int, shared: float = 0.0
) -> torch.Tensor:
    g = generator(seed, "expert", expert, name)
    std = float(base.std()) if base.numel() > 1 else 1.0
    if kind == "full" or base.dim() != 2:
        own = torch.randn(base.shape, generator=g) * std * scale
        if not shared:
            return own
        # a direction shared by all experts, each taking it with its own sign per row: rows
        # where an expert is in the minority conflict with the mean update, as real experts do
        common = torch.randn(base.shape, generator=generator(seed, "shared", name)) * std * scale
        signs = torch.randint(0, 2, base.shape[:1] + (1,) * (base.dim() - 1), generator=g) * 2.0 - 1.0
        return shared * signs * common + (1 - shared) * own
    out_f, in_f = base.shape
    b = torch.randn(out_f, rank, generator=g)
    a = torch.randn(rank, in_f, generator=g)
    return (b @ a) * (std * scale / math.sqrt(rank))


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: str, layout, seed: int, expert: int, kind: str, args) -> int:
    """A PEFT LoRA or OFT (≥ 0.16 packed) adapter with random, deterministic parameters."""
    os.makedirs(folder, exist_ok=True)
    shapes = {n: s for n, s in layout}
    modules = [
        n[: -len(".weight")] for n, s in layout if len(s) == 2 and any(f".{t}.weight" in n for t in args.targets)
    ]
    tensors = []
    for m in modules:
        out_f, in_f = shapes[m + ".weight"]
        g = generator(seed, kind, expert, m)
        key = "base_model.model." + m
        if kind == "lora":
            a = torch.randn(args.rank, in_f, generator=g) / math.sqrt(in_f)
            b = torch.randn(out_f, args.rank, generator=g) * args.scale
            tensors += [(key + ".lora_A.weight", a), (key + ".lora_B.weight", b)]
        else:
            bs = args.oft_block_size
            if in_f % bs:
                raise SystemExit(f"--oft-block-size {bs} does not divide {m}'s input width {in_f}")
            packed = torch.randn(in_f // bs, bs * (bs - 1) // 2, generator=g) * args.scale
            tensors.append((key + ".oft_R.weight", packed))
    config = {
        "peft_type": kind.upper(),
        "target_modules": list(args.targets),
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "peft_version": "0.21.2",
        "bias": "none",
    }
    if kind == "lora":
        config |= {
            "r": args.rank,
            "lora_alpha": 2 * args.rank,
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
        }
    else:
        config |= {
            "r": 0,
            "oft_block_size": args.oft_block_size,
            "module_dropout": 0.0,
            "init_weights": True,
            "coft": False,
            "eps": 6e-5,
            "block_share": False,
            "use_cayley_neumann": not args.oft_exact,
            "num_cayley_neumann_terms": 5,
        }
    layout_out = [(k, "F32", tuple(t.shape)) for k, t in tensors]
    with ShardWriter(os.path.join(folder, "adapter_model.safetensors"), layout_out, {"format": "pt"}) as w:
        for k, t in tensors:
            w.write(k, t.float().contiguous())
        w.commit()
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sum(t.numel() for _, t in tensors)


def write_model(folder: str, tensors, dtype: torch.dtype, shard_size: int) -> None:
    """Write (name, shape, make()) triples as sharded safetensors + index, one tensor at a time."""
    os.makedirs(folder, exist_ok=True)
    item = torch.empty((), dtype=dtype).element_size()
    groups, size = [[]], 0
    for entry in tensors:
        nbytes = math.prod(entry[1]) * item
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        layout = [(n, DTYPE_NAMES[dtype], s) for n, s, _ in group]
        with ShardWriter(os.path.join(folder, fname), layout, {"format": "pt"}) as w:
            for n, _, make in group:
                w.write(n, make().to(dtype))
                weight_map[n] = fname
            w.commit()
    total = sum(math.prod(s) * item for _, s, _ in tensors)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config(folder: str, args, preset) -> None:
    hidden, inter, layers, heads, kv, vocab = preset
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied,
        "attention_bias": args.bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(args.torch_dtype).removeprefix("torch."),
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t, i in list(vocab_map.items())[:3]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"},
    }
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
            },
            f,
            indent=2,
        )


def write_folder(job) -> int:
    """base/ (expert None) or expert-E/; returns an adapter's parameter count (else 0)."""
    args, preset, layout, e = job
    shard = parse_size(args.shard_size)
    if args.jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    if e is None:
        d = os.path.join(args.out, "base")
        write_model(
            d, [(n, s, (lambda n=n, s=s: base_tensor(n, s, args.seed))) for n, s in layout], args.torch_dtype, shard
        )
        write_config(d, args, preset)
        return 0

    def make(n, s):
        b = base_tensor(n, s, args.seed)
        return b + expert_delta(n, b, args.seed, e, args.kind, args.scale, args.rank, args.shared)

    d = os.path.join(args.out, f"expert-{e}")
    if args.kind in ("lora", "oft"):
        return write_adapter(d, layout, args.seed, e, args.kind, args)
    write_model(d, [(n, s, (lambda n=n, s=s: make(n, s))) for n, s in layout], args.torch_dtype, shard)
    write_config(d, args, preset)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to create base/ and expert-i/ in")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument(
        "--kind",
        choices=["full", "lowrank", "lora", "oft"],
        default="full",
        help="full/lowrank: dense expert models; lora/oft: PEFT adapters",
    )
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), help="modules that lora/oft adapters target")
    ap.add_argument("--oft-block-size", type=int, default=16)
    ap.add_argument(
        "--oft-exact", action="store_true", help="OFT adapters use the exact Cayley map (use_cayley_neumann false)"
    )
    ap.add_argument("--rank", type=int, default=8, help="rank of lowrank deltas")
    ap.add_argument("--scale", type=float, default=0.05, help="delta size relative to each tensor's std")
    ap.add_argument(
        "--shared",
        type=float,
        default=0.0,
        help="full experts: weight of a per-row direction shared by all experts with random signs (0: independent "
        "deltas, which almost never conflict)",
    )
    ap.add_argument("--tied", action="store_true", help="tie lm_head to embed_tokens (no lm_head tensor)")
    ap.add_argument("--bias", action="store_true", help="give q/k/v projections biases")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="make the base and the experts in this many processes")
    args = ap.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype)
    preset = list(PRESETS[args.preset])
    if args.layers:
        preset[2] = args.layers
    layout = llama_layout(*preset, tied=args.tied, bias=args.bias)
    folders = [None, *range(1, args.experts + 1)]  # the base, then each expert
    if args.jobs > 1 and args.kind not in ("lora", "oft"):
        # each folder depends on the seed alone, so they are made in parallel with the same bytes
        # (forked: nothing is pickled, so this works however the module was loaded)
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        for start in range(0, len(folders), args.jobs):
            procs = [
                ctx.Process(target=write_folder, args=((args, preset, layout, e),))
                for e in folders[start : start + args.jobs]
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
                if p.exitcode != 0:
                    raise SystemExit(f"making a folder failed (exit {p.exitcode})")
        sizes = [0]
    else:  # adapters are small: one process
        sizes = [write_folder((args, preset, layout, e)) for e in folders]
    adapter_params = sizes[-1]
    params = sum(math.prod(s) for _, s in layout)
    if args.kind in ("lora", "oft"):
        print(
            f"wrote {args.out}: base of {params / 1e6:.1f} M parameters + {args.experts} {args.kind} adapters of "
            f"{adapter_params / 1e6:.3f} M parameters each"
        )
    else:
        print(f"wrote {args.out}: base + {args.experts} {args.kind} experts, {params / 1e6:.1f} M parameters each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
