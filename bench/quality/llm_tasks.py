"""The decoder-LLM benchmark's five generative tasks, built offline and deterministically.

Every example is a prompt (a one-line instruction, the input, "Answer:") and an answer of one to
six words, generated greedily through the model's own LM head and scored by exact match. The
tasks conflict in pairs: polarity and intensity label sentences of one kind (VADER's) two
different ways; number_words and arithmetic both answer with numbers, one in words and one in
digits. doc_topic stands apart (Python standard-library docstrings by module family).
No input is shared between tasks or between splits: the VADER sentences are split into two
disjoint pools (one per task) before anything else, and each task's train/val/test are disjoint.
The split seed is fixed (0): the data do not vary with the training seed.
"""

from __future__ import annotations

import random

from tasks import TOPICS, _docstrings, _vader

TASKS = ("polarity", "intensity", "doc_topic", "number_words", "arithmetic")
SIZES = {"train": 480, "val": 80, "test": 240}  # per task: 1,200 test prompts in all
INSTRUCTIONS = {
    "polarity": "Is this sentence positive or negative?",
    "intensity": "Is the feeling in this sentence strong or mild?",
    "doc_topic": "Is this Python docstring about files, network, text or numbers?",
    "number_words": "Write the number in words.",
    "arithmetic": "Add the numbers.",
}
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
ONES = (ONES + "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    """0 ≤ n < 1000 in English words, as the task expects them ("three hundred forty-two")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + in_words(rest))


def prompt(task: str, text: str) -> str:
    return f"{INSTRUCTIONS[task]}\n{text}\nAnswer:"


def _balanced(by_label: dict[str, list[str]], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Each split with (as near as the pool allows) equal numbers per label."""
    labels = sorted(by_label)
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SIZES}
    for label in labels:
        texts = sorted(set(by_label[label]))
        rng.shuffle(texts)
        start = 0
        for split, size in SIZES.items():
            k = size // len(labels)
            chunk = texts[start : start + k]
            if len(chunk) < k:
                raise SystemExit(f"task data: only {len(texts)} inputs labelled {label!r}")
            out[split] += [(t, label) for t in chunk]
            start += k
    for split in out:
        rng.shuffle(out[split])
    return out


def build(split_seed: int = 0) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{task: {"train"/"val"/"test": [(prompt, answer)]}}."""
    rng = random.Random(split_seed)
    vader = sorted({(t, r) for t, r, _ in _vader() if len(t) <= 120})
    rng.shuffle(vader)
    half = len(vader) // 2
    pool_polarity, pool_intensity = vader[:half], vader[half:]
    data = {
        "polarity": _balanced(
            {"negative": [t for t, r in pool_polarity if r <= -1], "positive": [t for t, r in pool_polarity if r >= 1]},
            rng,
        ),
        "intensity": _balanced(
            {
                "mild": [t for t, r in pool_intensity if abs(r) <= 0.75],
                "strong": [t for t, r in pool_intensity if abs(r) >= 2],
            },
            rng,
        ),
        "doc_topic": _balanced({k: [t for t, topic, _ in _docstrings() if topic == k] for k in TOPICS}, rng),
    }
    numbers = list(range(1000))
    rng.shuffle(numbers)
    cut = [0, SIZES["train"], SIZES["train"] + SIZES["val"], sum(SIZES.values())]
    data["number_words"] = {
        split: [(str(n), in_words(n)) for n in numbers[cut[i] : cut[i + 1]]] for i, split in enumerate(SIZES)
    }
    pairs = sorted({(a, b) for a in range(10, 100) for b in range(10, 100) if a <= b})
    rng.shuffle(pairs)
    data["arithmetic"] = {
        split: [(f"{a} + {b}", str(a + b)) for a, b in pairs[cut[i] : cut[i + 1]]] for i, split in enumerate(SIZES)
    }
    return {
        task: {split: [(prompt(task, x), y) for x, y in rows] for split, rows in data[task].items()} for task in TASKS
    }


if __name__ == "__main__":
    built = build()
    for name, t in built.items():
        print(name, {s: len(v) for s, v in t.items()}, t["test"][0])
    seen: dict[str, str] = {}
    for name, t in built.items():
        for split, rows in t.items():
            for p, _ in rows:
                x = p.split("\n")[1]
                assert seen.setdefault(x, f"{name}/{split}") == f"{name}/{split}", (x, seen[x], name, split)
    print("every input appears in one task and one split")
