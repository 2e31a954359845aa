#!/usr/bin/env python3
"""Train (or find cached) the decoder-LLM benchmark's experts on SmolLM2-135M-Instruct: per task
and seed a PEFT OFT adapter and a PEFT LoRA adapter, and per seed a multi-task LoRA trained on all
five tasks together (the upper bound a merge is measured against).

    python bench/quality/llm_train.py --seeds 0 1 2                  # everything
    python bench/quality/llm_train.py --kinds oft --tasks polarity --seeds 0 --steps 20   # a probe

Training: AdamW, batch BATCH, STEPS steps (the multi-task adapter takes STEPS × 5 over the five
tasks' mixed training sets, so it sees what the five experts see together), answers' tokens only
in the loss, one fixed learning rate per kind. Deterministic for a seed (torch's generator seeds
the adapters and the batch order). Every linear layer of every block is adapted (q, k, v, o,
gate, up, down): LoRA r = 8, α = 16; OFT blocks of 32 (the paper's setting, peft's OFT).
Output per expert under ~/.cache/streammerge-quality/llm/experts/KIND-TASK-sSEED/ (the folder
STREAMMERGE_QUALITY_CACHE names, if set, for ~/.cache/streammerge-quality): `adapter/` (PEFT
format) and `meta.json` (validation exact match of every task, steps, seconds, loss curve).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from llm_common import LLM_CACHE, base_folder, exact_match, load_model, tokenizer, training_batch  # noqa: E402
from llm_tasks import TASKS, build  # noqa: E402

KINDS = ("oft", "lora", "multitask")
LR = {"oft": 5e-4, "lora": 1e-3, "multitask": 1e-3}
BATCH, STEPS = 16, 80
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expert_dir(kind: str, task: str, seed: int) -> str:
    return os.path.join(LLM_CACHE, "experts", f"{kind}-{task}-s{seed}")


def peft_model(kind: str):
    import peft

    model = load_model(base_folder())
    if kind == "oft":
        config = peft.OFTConfig(oft_block_size=32, target_modules=TARGETS)
    else:
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def train_one(kind: str, task: str, seed: int, data: dict, steps: int) -> dict:
    torch.manual_seed(seed)
    tok = tokenizer()
    model = peft_model(kind)
    rows = [r for t in TASKS for r in data[t]["train"]] if task == "all" else list(data[task]["train"])
    steps = steps * len(TASKS) if task == "all" else steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[kind], weight_decay=0.0)
    rng = random.Random(seed)
    order: list = []
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < BATCH:
            order += rng.sample(rows, len(rows))
        batch, order = order[:BATCH], order[BATCH:]
        loss = model(**training_batch(tok, batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(float(loss), 4))
    seconds = time.perf_counter() - start
    model.eval()
    val = {t: sum(ok) / len(ok) for t in TASKS for ok in [exact_match(model, tok, data[t]["val"])]}
    return {"model": model, "meta": {"kind": kind, "task": task, "seed": seed, "steps": steps, "batch": BATCH,
            "lr": LR[kind], "train_seconds": round(seconds, 1), "val": val, "loss": losses}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build()
    for seed in args.seeds:
        for kind in args.kinds:
            for task in ["all"] if kind == "multitask" else args.tasks:
                folder = expert_dir(kind, task, seed)
                if os.path.exists(os.path.join(folder, "meta.json")) and not args.retrain:
                    continue
                result = train_one(kind, task, seed, data, args.steps)
                tmp = folder + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                result["model"].save_pretrained(os.path.join(tmp, "adapter"))
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(result["meta"], f, indent=1)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
                m = result["meta"]
                print(f"{kind}-{task}-s{seed}: {m['train_seconds']} s, loss {m['loss'][0]} → {m['loss'][-1]}, "
                      f"val {json.dumps(m['val'])}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
