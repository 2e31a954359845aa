"""What a merge reads, in order, and how: the byte ranges of every input tensor in the order the
shards consume them, each item either read ahead into a reused buffer (direct) or only hinted to
the kernel (prefetch.py reads them).

Why buffers: on a cold cache, reading through the page cache cost a task-arithmetic merge of the
0.5 B preset 2.3–3 s more than a warm one (page-cache pages made and first touched, user and
system time); reading the same bytes with O_DIRECT into a few reused buffers removed it
(bench/results/README.md, "Round nine"). A buffer holds one row block of a tensor from every
input (a group), so it serves only a method that reads each block once, in order
(Method.reads_once); every other tensor's bytes are hinted, as before, and read in place.
"""

from __future__ import annotations

from collections.abc import Callable

from ..io.checkpoint import Checkpoint
from ..methods.base import row_blocks
from ..prefetch import ReadItem
from .inputs import Shard

READ_SLOTS = 2  # groups held at once: the one being merged and the next, being read
MAX_GROUP = 128 * 1024 * 1024  # a larger group (a single row longer than that) is hinted instead


def read_items(base, experts: list, shards: list[Shard], in_blocks: Callable[[str], bool]) -> list[ReadItem]:
    """Every input tensor the shards read, in order: a merged tensor's bytes from the base and each
    stored expert, a copied tensor's from the base. `in_blocks(name)`: the method reads this
    tensor's row blocks once each, in order (then one direct item per row block)."""
    items = []
    for shard in shards:
        for t in shard.tensors:
            sources = [s for s in ((base, *experts) if t.merged else (base,)) if isinstance(s, Checkpoint)]
            if t.merged and in_blocks(t.name) and len(sources) == 1 + len(experts):
                # a model that is both the base and an expert (mergekit's linear) is read once
                groups = [ReadItem(tuple(dict.fromkeys(s.piece(t.name, rows) for s in sources)), True)
                          for rows in row_blocks(t.shape)]  # fmt: skip
                if all(g.span <= MAX_GROUP for g in groups):
                    items += groups
                    continue
            items.append(ReadItem(tuple(dict.fromkeys(s.piece(t.name) for s in sources)), False))
    return items


def schedule(base, experts: list, shards: list[Shard], method, values: dict) -> list[ReadItem]:
    """read_items for a merge: in blocks where the method reads each block once (Method.reads_once)."""
    return read_items(base, experts, shards,
                      lambda name: method.reads_once(values[name].params, values[name].experts))  # fmt: skip


def ring_bytes(items: list[ReadItem]) -> int:
    """The buffers the direct items need: READ_SLOTS of the largest group (0: none is direct)."""
    return READ_SLOTS * max((i.span for i in items if i.direct), default=0)
