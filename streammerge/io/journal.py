"""The merge record `streammerge.json` in the output folder.

It is the journal while a merge runs (fingerprint, shard plan, finished shards with sha256,
model statistics) and the machine-readable record of recipe and inputs once it is complete.
It is rewritten atomically after every finished shard, so it never claims a shard that is not
durable under its final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ResumeError
from .atomic import write_bytes_atomic

JOURNAL_NAME = "streammerge.json"
FORMAT_VERSION = 1


@dataclass
class Journal:
    path: str
    fingerprint: str
    recipe: dict[str, Any]
    inputs: dict[str, Any]
    shards: list[str]
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, size}
    statistics: Any = None
    complete: bool = False
    # progress inside the shard being written: {"shard", "tensors", "offset"} of its temporary
    # file, which is fsynced up to `offset` before this is saved
    partial: dict[str, Any] | None = None
    # device of each merged tensor on the first run, reused on resume: GPU and CPU results may
    # differ in the last bits, and the free memory that decided placement may have changed
    placement: dict[str, str] = field(default_factory=dict)

    def save(self) -> None:
        doc = {
            "format": FORMAT_VERSION,
            "tool": "streammerge",
            "fingerprint": self.fingerprint,
            "complete": self.complete,
            "recipe": self.recipe,
            "inputs": self.inputs,
            "shards": self.shards,
            "finished": self.finished,
            "statistics": self.statistics,
            "partial": self.partial,
            "placement": self.placement,
        }
        write_bytes_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: str) -> "Journal":
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("tool") != "streammerge" or doc.get("format") != FORMAT_VERSION:
                raise ValueError("not a streammerge record of this format")
            return cls(
                path,
                doc["fingerprint"],
                doc["recipe"],
                doc["inputs"],
                list(doc["shards"]),
                dict(doc["finished"]),
                doc.get("statistics"),
                bool(doc.get("complete")),
                doc.get("partial"),
                dict(doc.get("placement") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path}: unreadable merge record ({exc}); pass --restart to start over") from None


def journal_path(out: str) -> str:
    return os.path.join(out, JOURNAL_NAME)
