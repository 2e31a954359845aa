"""The five classification tasks of the quality benchmark, built offline and deterministically.

They come in conflicting pairs: the same sentences carry different labels in different tasks, so
experts trained on them pull the shared encoder different ways.
- polarity: VADER sentences (tweets, movie, Amazon, NYT), mean rating ≥ 1 → positive, ≤ −1 → negative.
- intensity: the same pool, strong (|rating| ≥ 2) against mild (|rating| ≤ 0.75), either sign.
- source: which of the four VADER collections a sentence comes from (4 classes).
- doc_topic: first docstring lines of Python's standard library, by module family (files and
  processes, networking and the web, text and data formats, numbers and time: 4 classes).
- doc_kind: the same docstring pool, whether the line documents a module, a class or a function.
Each task: TRAIN / VAL / TEST examples per class drawn without replacement by a seeded shuffle
(the split seed is fixed, 0: the data do not vary with the training seed), from the sentences and
lines no earlier task (DRAW_ORDER) drew: no input appears in two tasks, so no test input is in
another task's training data (until #28, 39 % of doc_kind's test lines were in doc_topic's training set).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import warnings

DATA = os.environ.get(
    "STREAMMERGE_VADER",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "vader-icwsm2014"),
)
VADER_FILES = {
    "tweet": "tweets_GroundTruth.txt",
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
TOPICS = {
    "files": [
        "os",
        "os.path",
        "shutil",
        "pathlib",
        "glob",
        "fnmatch",
        "tempfile",
        "subprocess",
        "stat",
        "filecmp",
        "zipfile",
        "tarfile",
        "io",
    ],
    "network": [
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "smtplib",
        "ftplib",
        "imaplib",
        "poplib",
        "email.message",
        "email.utils",
        "xmlrpc.client",
        "socketserver",
        "ipaddress",
        "asyncio.streams",
    ],
    "text": [
        "string",
        "re",
        "textwrap",
        "difflib",
        "csv",
        "json",
        "html",
        "html.parser",
        "xml.dom.minidom",
        "xml.etree.ElementTree",
        "configparser",
        "codecs",
        "unicodedata",
        "base64",
        "tokenize",
        "pprint",
        "gettext",
        "locale",
    ],
    "numbers": [
        "math",
        "cmath",
        "decimal",
        "fractions",
        "statistics",
        "random",
        "numbers",
        "datetime",
        "time",
        "calendar",
        "heapq",
        "bisect",
        "array",
        "operator",
        "itertools",
        "zoneinfo",
    ],
}
PER_CLASS = {"train": 160, "val": 60, "test": 120}
TASKS = ("polarity", "intensity", "source", "doc_topic", "doc_kind")
# scarcest classes first (doc_kind's module lines, intensity's strong sentences)
DRAW_ORDER = ("doc_kind", "doc_topic", "intensity", "polarity", "source")


def _vader() -> list[tuple[str, float, str]]:
    rows = []
    for source, name in VADER_FILES.items():
        with open(os.path.join(DATA, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3 and parts[2].strip():
                    rows.append((parts[2].strip(), float(parts[1]), source))
    return rows


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    line = inspect.cleandoc(doc).strip().split("\n\n")[0].replace("\n", " ").strip()
    return line if 20 <= len(line) <= 300 else None


def _docstrings() -> list[tuple[str, str, str]]:
    """(line, topic, kind) for the listed modules, their classes and their functions."""
    rows, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for topic, modules in TOPICS.items():
            for name in modules:
                try:
                    mod = importlib.import_module(name)
                except ImportError:
                    continue
                items = [(mod, "module")]
                for attr in sorted(vars(mod)):
                    obj = getattr(mod, attr)
                    if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                        continue
                    if inspect.isclass(obj):
                        items.append((obj, "class"))
                        items += [
                            (m, "function")
                            for k, m in sorted(vars(obj).items())
                            if not k.startswith("_") and inspect.isfunction(m)
                        ]
                    elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                        items.append((obj, "function"))
                for obj, kind in items:
                    line = _first_line(getattr(obj, "__doc__", None))
                    if line and line not in seen:
                        seen.add(line)
                        rows.append((line, topic, kind))
    return rows


def _split(by_class: dict[str, list[str]], rng: random.Random) -> dict[str, list[tuple[str, int]]]:
    labels = sorted(by_class)
    need = sum(PER_CLASS.values())
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in PER_CLASS}
    for label_id, label in enumerate(labels):
        texts = sorted(set(by_class[label]))
        rng.shuffle(texts)
        take = min(len(texts), need)
        scale = take / need  # a small class gives proportionally smaller splits
        start = 0
        for split, count in PER_CLASS.items():
            k = int(count * scale)
            out[split] += [(t, label_id) for t in texts[start : start + k]]
            start += k
    for split in out:
        rng.shuffle(out[split])
    return out


def build(split_seed: int = 0) -> dict[str, dict]:
    """{task: {"labels": [...], "train"/"val"/"test": [(text, label id)]}}."""
    rng = random.Random(split_seed)
    vader, docs = _vader(), _docstrings()
    classes: dict[str, dict[str, list[str]]] = {
        "polarity": {"negative": [t for t, r, _ in vader if r <= -1], "positive": [t for t, r, _ in vader if r >= 1]},
        "intensity": {
            "mild": [t for t, r, _ in vader if abs(r) <= 0.75],
            "strong": [t for t, r, _ in vader if abs(r) >= 2],
        },
        "source": {s: [t for t, _, src in vader if src == s] for s in VADER_FILES},
        "doc_topic": {k: [t for t, topic, _ in docs if topic == k] for k in TOPICS},
        "doc_kind": {k: [t for t, _, kind in docs if kind == k] for k in ("module", "class", "function")},
    }
    tasks, used = {}, set()
    for name in DRAW_ORDER:  # each task draws from what the tasks before it left: no input in two tasks
        free = {label: [t for t in texts if t not in used] for label, texts in classes[name].items()}
        tasks[name] = {"labels": sorted(free)} | _split(free, rng)
        used.update(t for split in PER_CLASS for t, _ in tasks[name][split])
    return {name: tasks[name] for name in TASKS}


if __name__ == "__main__":
    built = build()
    for name, t in built.items():
        print(f"{name:10s} classes {t['labels']} train {len(t['train'])} val {len(t['val'])} test {len(t['test'])}")
    seen: dict[str, str] = {}
    for name, t in built.items():
        for split in PER_CLASS:
            for text, _ in t[split]:
                assert seen.setdefault(text, name) == name, (text, name, seen[text])
    print("every input appears in one task")
