#!/usr/bin/env python3
"""Train (or find cached) the quality benchmark's experts: per task and seed an OFT adapter, a
LoRA adapter (peft) and a full fine-tune of MiniLM-L6's encoder, each with its own linear head;
per kind and seed a multi-task one, trained on every task at once with a head per task (the upper
bound a merge is measured against).

    python bench/quality/train_experts.py --seeds 0 1 2            # all kinds, all tasks
    python bench/quality/train_experts.py --kinds oft --tasks polarity --seeds 0

Training: AdamW, batch 16, sequences cut at 64 tokens; validation accuracy every EVAL_EVERY
steps; stops after PATIENCE evaluations without improvement or at MAX_STEPS, and keeps the best
validation state (converged on the validation split, as the benchmark asks). Deterministic for a
seed: torch's generator seeds the head, the adapters and the batch order; one thread.
Output per expert under ~/.cache/streammerge-quality/experts/KIND-TASK-sSEED/ (the folder
STREAMMERGE_QUALITY_CACHE names, if set, for ~/.cache/streammerge-quality): `adapter/` (PEFT
format) or `model/` (Hugging Face folder), `head.pt`, `meta.json` (accuracies, steps, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import accuracy, embed, expert_dir, model_folder, tokenised  # noqa: E402
from tasks import TASKS, build  # noqa: E402

KINDS = ("oft", "lora", "full")
LR = {"oft": 2e-3, "lora": 1e-3, "full": 5e-5}
HEAD_LR = 2e-3
BATCH, EVAL_EVERY, PATIENCE, MAX_STEPS = 16, 20, 3, 200
# the cached experts were chosen by validation scored in batches of 64: a rebuild does the same
EVAL_BATCH = 64
TARGETS = ["query", "key", "value", "dense"]  # every linear layer of the encoder


def make_encoder(kind: str, folder: str):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder)
    if kind == "full":
        return encoder
    import peft

    if kind == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    else:
        config = peft.OFTConfig(oft_block_size=32, target_modules=TARGETS)
    return peft.get_peft_model(encoder, config)


def train_one(kind: str, task: str, seed: int, data: dict, n_classes: int, folder: str) -> dict:
    torch.manual_seed(seed)
    encoder = make_encoder(kind, folder)
    head = torch.nn.Linear(384, n_classes)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": params, "lr": LR[kind]}, {"params": head.parameters(), "lr": HEAD_LR}], weight_decay=0.0
    )
    ids, mask, labels = data["train"]
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, None)
    step, stale, started = 0, 0, time.perf_counter()
    while step < MAX_STEPS and stale < PATIENCE:
        order = torch.randperm(len(labels), generator=gen)
        for s in range(0, len(order) - BATCH + 1, BATCH):
            encoder.train()
            idx = order[s : s + BATCH]
            loss = torch.nn.functional.cross_entropy(head(embed(encoder, ids[idx], mask[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % EVAL_EVERY == 0:
                acc = accuracy(encoder, head, data["val"], batch=EVAL_BATCH)
                if acc > best[0]:
                    best = (
                        acc,
                        step,
                        (
                            {k: v.detach().clone() for k, v in encoder.state_dict().items()},
                            {k: v.detach().clone() for k, v in head.state_dict().items()},
                        ),
                    )
                    stale = 0
                else:
                    stale += 1
            if step >= MAX_STEPS or stale >= PATIENCE:
                break
    encoder.load_state_dict(best[2][0])
    head.load_state_dict(best[2][1])
    meta = {
        "kind": kind,
        "task": task,
        "seed": seed,
        "val_accuracy": best[0],
        "best_step": best[1],
        "steps": step,
        "test_accuracy": accuracy(encoder, head, data["test"], batch=EVAL_BATCH),
        "seconds": round(time.perf_counter() - started, 1),
        "trainable_parameters": sum(p.numel() for p in params),
        "lr": LR[kind],
        "batch": BATCH,
    }
    save(expert_dir(kind, task, seed), kind, encoder, head.state_dict(), meta)
    return meta


def save(out: str, kind: str, encoder, head_state: dict, meta: dict) -> None:
    """The encoder (a PEFT adapter, or the whole model for `full`), its head(s) and meta, written
    under a temporary name and renamed: a cached expert is complete or absent."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    encoder.save_pretrained(os.path.join(tmp, "model" if kind == "full" else "adapter"))
    torch.save(head_state, os.path.join(tmp, "head.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def train_multitask(kind: str, seed: int, data: dict, n_classes: dict, folder: str) -> dict:
    """One encoder adapted on all tasks at once, a head per task (the upper bound a merge is
    measured against): batches cycle through the tasks, MAX_STEPS × tasks steps at most, validation
    on the mean accuracy; saved like an expert, `head.pt` holding {task: head state}."""
    tasks = list(data)
    torch.manual_seed(seed)
    encoder = make_encoder(kind, folder)
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(384, n_classes[t]) for t in tasks})
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": params, "lr": LR[kind]}, {"params": heads.parameters(), "lr": HEAD_LR}], weight_decay=0.0
    )
    gen = torch.Generator().manual_seed(seed)
    orders = {t: iter(()) for t in tasks}

    def batch(t: str) -> torch.Tensor:
        idx = next(orders[t], None)
        if idx is None:  # a new epoch of this task
            perm = torch.randperm(len(data[t]["train"][2]), generator=gen)
            orders[t] = iter([perm[s : s + BATCH] for s in range(0, len(perm) - BATCH + 1, BATCH)])
            idx = next(orders[t])
        return idx

    def mean_val() -> float:
        return sum(accuracy(encoder, heads[t], data[t]["val"], batch=EVAL_BATCH) for t in tasks) / len(tasks)

    best = (-1.0, 0, None)
    step, stale, started, every = 0, 0, time.perf_counter(), EVAL_EVERY * len(tasks)
    while step < MAX_STEPS * len(tasks) and stale < PATIENCE:
        t = tasks[step % len(tasks)]
        ids, mask, labels = data[t]["train"]
        idx = batch(t)
        encoder.train()
        loss = torch.nn.functional.cross_entropy(heads[t](embed(encoder, ids[idx], mask[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % every == 0:
            acc = mean_val()
            if acc > best[0]:
                state = ({k: v.detach().clone() for k, v in encoder.state_dict().items()},
                         {k: v.detach().clone() for k, v in heads.state_dict().items()})  # fmt: skip
                best, stale = (acc, step, state), 0
            else:
                stale += 1
    encoder.load_state_dict(best[2][0])
    heads.load_state_dict(best[2][1])
    meta = {
        "kind": kind,
        "task": "multitask",
        "seed": seed,
        "val_accuracy": best[0],
        "best_step": best[1],
        "steps": step,
        "test_accuracy": {t: accuracy(encoder, heads[t], data[t]["test"], batch=EVAL_BATCH) for t in tasks},
        "seconds": round(time.perf_counter() - started, 1),
        "lr": LR[kind],
        "batch": BATCH,
    }
    save(expert_dir(kind, "multitask", seed), kind, encoder, {t: h.state_dict() for t, h in heads.items()}, meta)
    return meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: byte-identical experts)")
    ap.add_argument("--no-multitask", dest="multitask", action="store_false",
                    help="skip the multi-task adapter (trained on --tasks together) of each kind and seed")  # fmt: skip
    ap.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap the training steps (a probe: give it a scratch STREAMMERGE_QUALITY_CACHE)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.max_steps:
        global MAX_STEPS
        MAX_STEPS = args.max_steps
    from transformers import AutoTokenizer

    folder = model_folder()
    tasks = build()
    data = tokenised({t: tasks[t] for t in args.tasks}, AutoTokenizer.from_pretrained(folder))
    for seed in args.seeds:
        for kind in args.kinds:
            for task in args.tasks + (["multitask"] if args.multitask else []):
                if os.path.exists(os.path.join(expert_dir(kind, task, seed), "meta.json")):
                    continue
                if task == "multitask":
                    n_classes = {t: len(tasks[t]["labels"]) for t in args.tasks}
                    meta = train_multitask(kind, seed, data, n_classes, folder)
                else:
                    meta = train_one(kind, task, seed, data[task], len(tasks[task]["labels"]), folder)
                print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
