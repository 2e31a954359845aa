"""What a merge reads, in order, and how: the byte ranges of every input tensor in the order the
shards consume them, each item either read ahead into a reused buffer (direct) or only hinted to
the kernel (prefetch.py reads them).

Why buffers: on a cold cache, reading through the page cache cost a task-arithmetic merge of the
0.5 B preset 2–3.5 s more than a warm one, and TIES 3–4.7 s (page-cache pages made and first
touched: user and system time); reading the same bytes with O_DIRECT into a few reused buffers
took most of it away (bench/results/README.md, "Round nine"). A buffer holds one row block of a
tensor from every input (a group) where the method reads each block once, in order
(Method.reads_once), so any tensor fits; else a whole tensor from every input, which bounds the
tensors it serves (MAX_WHOLE); every other tensor's bytes are hinted, as before, and read in place.
"""

from __future__ import annotations

from collections.abc import Callable

from ..io.checkpoint import Checkpoint
from ..methods.base import row_blocks
from ..prefetch import ReadItem
from .inputs import Shard

READ_SLOTS = 2  # groups held at once: the one being merged and the next, being read
MAX_GROUP = 128 * 1024 * 1024  # a larger group (a single row longer than that) is hinted instead
# a tensor whose bytes from every input exceed this is hinted where its method reads it more than
# once (the 0.5 B preset's MLP weights, 35 MB from four inputs, and the 1.5 B preset's, 110 MB, are
# read into buffers; an 8B model's, 470 MB, are not). At 64 MB the 1.5 B TIES merge read those
# through the page cache: 1.3-1.6x the time cold, 176 MB less at its peak (bench/results/README.md)
MAX_WHOLE = 128 * 1024 * 1024


def read_items(base, experts: list, shards: list[Shard], in_blocks: Callable[[str], bool]) -> list[ReadItem]:
    """Every input tensor the shards read, in order: a merged tensor's bytes from the base and each
    stored expert, a copied tensor's from the base. Where every input is a stored checkpoint, a
    merged tensor is read into buffers: one direct item per row block where `in_blocks(name)`
    (the method reads each row block once, in order), else one item of the whole tensor where
    it fits MAX_WHOLE (the method may read its rows in any order, any number of times: every
    method reads one tensor at a time); the rest is hinted."""
    items = []
    for shard in shards:
        for t in shard.tensors:
            sources = [s for s in ((base, *experts) if t.merged else (base,)) if isinstance(s, Checkpoint)]
            # a model that is both the base and an expert (mergekit's linear) is read once
            whole = ReadItem(tuple(dict.fromkeys(s.piece(t.name) for s in sources)), False)
            if t.merged and len(sources) == 1 + len(experts):
                if in_blocks(t.name):
                    groups = [ReadItem(tuple(dict.fromkeys(s.piece(t.name, rows) for s in sources)), True)
                              for rows in row_blocks(t.shape)]  # fmt: skip
                    if all(g.span <= MAX_GROUP for g in groups):
                        items += groups
                        continue
                elif whole.span <= MAX_WHOLE:
                    items.append(ReadItem(whole.pieces, True, whole=True))
                    continue
            items.append(whole)
    return items


def schedule(base, experts: list, shards: list[Shard], method, values: dict) -> list[ReadItem]:
    """read_items for a merge: in blocks where the method reads each block once (Method.reads_once)."""
    return read_items(base, experts, shards,
                      lambda name: method.reads_once(values[name].params, values[name].experts))  # fmt: skip


def ring_bytes(items: list[ReadItem]) -> int:
    """The buffers the direct items need (0: none is direct): the largest READ_SLOTS of them in a
    row, one being merged while the next ones are read."""
    spans = [i.span for i in items if i.direct]
    return max((sum(spans[j : j + READ_SLOTS]) for j in range(len(spans))), default=0)
