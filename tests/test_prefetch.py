"""The read-ahead thread (streammerge/prefetch.py): hinted items stay within its window of the
consumer and are all covered; direct items are read past the page cache into at most `ring`
bytes of reused buffers and lent as the file's own bytes; a group the page cache holds is left
there; a piece it cannot lend is None, never a wait that cannot end; and a merge that reads its
blocks this way writes the same bytes as one that reads them through the map."""

from __future__ import annotations

import os
import random
import time

import pytest

from streammerge import prefetch
from streammerge.io.direct import ALIGN
from streammerge.prefetch import ADVISE, PageCache, ReadAhead, ReadItem

from tests.conftest import evict, experts_of, make_toy, merge_hashes


def wait_for(cond, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def takes_direct(folder) -> bool:
    """O_DIRECT reads and page-cache eviction work here (not on macOS or Windows; tmpfs keeps
    every page in its cache)."""
    if not (prefetch.DIRECT and ADVISE):
        return False
    path = os.path.join(folder, "probe")
    with open(path, "wb") as f:
        f.write(bytes(3 * ALIGN))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return evict(path)


@pytest.mark.parametrize("advise", [False, True] if ADVISE else [False])
def test_the_read_ahead_stays_within_its_window_and_then_covers_every_range(tmp_path, advise):
    path = tmp_path / "shard"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    items = [ReadItem(((str(path), offset, 64 * 1024),), False) for offset in range(0, 1 << 20, 64 * 1024)]
    ahead = ReadAhead(items, window=128 * 1024, advise=advise).start()
    try:
        assert wait_for(lambda: ahead.read > 0)
        time.sleep(0.2)  # the consumer has taken nothing: the thread waits at its window
        assert ahead.read <= 128 * 1024 + 2 * 64 * 1024
        for _ in items:
            ahead.advance(64 * 1024)
        assert wait_for(lambda: ahead.read == 1 << 20)
    finally:
        ahead.stop()
    if advise:
        assert ahead.throughput() is None  # the kernel reads in the background: nothing timed here
    else:
        assert ahead.throughput() > 0


SIZE = (1 << 20) + 123


@pytest.fixture
def cold_files(tmp_path) -> tuple[list[str], list[bytes]]:
    """two_files, out of the page cache (skips where reads cannot be direct)."""
    if not takes_direct(tmp_path):
        pytest.skip("no O_DIRECT reads or page-cache eviction on this file system")
    paths, data = two_files(tmp_path, SIZE)
    assert evict(*paths)
    return paths, data


def two_files(tmp_path, size: int = SIZE) -> tuple[list[str], list[bytes]]:
    rng = random.Random(7)
    paths, data = [], []
    for name in ("a", "b"):
        data.append(rng.randbytes(size))
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as f:
            f.write(data[-1])
    return paths, data


def groups_of(paths: list[str], size: int) -> list[ReadItem]:
    """Groups of one piece from each file at awkward offsets and lengths, the last ending at the
    end of the files (not on a block boundary)."""
    cuts = [c for c in (0, 1, 4095, 4097, 70_001, 300_000, 300_001, 777_777) if c < size] + [size]
    return [ReadItem(tuple((p, a, b - a) for p in paths), True) for a, b in zip(cuts, cuts[1:])]


def test_direct_groups_lend_the_files_bytes_within_the_ring(cold_files):
    paths, data = cold_files
    items = groups_of(paths, SIZE)
    ring = 2 * max(i.span for i in items)
    ahead = ReadAhead(items, ring=ring).start()
    try:
        for item in items:
            for k, (path, offset, length) in enumerate(item.pieces):
                lent = ahead.take((path, offset, length))
                assert lent is not None
                assert bytes(lent) == data[k][offset : offset + length]
                assert ahead._pool.made <= ring
            for piece in item.pieces:
                assert ahead.give_back(piece)
                assert not ahead.give_back(piece)  # one loan, one return
        assert ahead.take(items[0].pieces[0]) is None  # passed: its buffer holds other bytes now
        assert ahead.take((paths[0], 5, 10)) is None  # not a piece of any item
    finally:
        ahead.stop()
    assert ahead.direct_bytes == sum(i.nbytes for i in items)
    assert ahead.throughput() > 0


def test_groups_the_page_cache_holds_are_left_there(tmp_path):
    if not (prefetch.DIRECT and ADVISE):
        pytest.skip("no O_DIRECT here")
    size = 300_001
    paths, _ = two_files(tmp_path, size)
    for p in paths:
        open(p, "rb").read()  # in the page cache now
    items = groups_of(paths, size)
    ahead = ReadAhead(items, ring=2 * max(i.span for i in items)).start()
    try:
        for item in items:
            assert all(ahead.take(piece) is None for piece in item.pieces)  # read in place, no copy
    finally:
        ahead.stop()
    assert ahead.direct_bytes == 0


def test_a_consumer_holding_every_buffer_reads_elsewhere_instead_of_waiting(cold_files):
    paths, data = cold_files
    items = groups_of(paths, SIZE)[3:6]
    ahead = ReadAhead(items, ring=max(i.span for i in items)).start()  # one group's buffer
    try:
        held = ahead.take(items[0].pieces[0])  # kept: the buffer cannot go back to the pool
        assert held is not None
        started = time.monotonic()
        assert ahead.take(items[1].pieces[0]) is None  # cannot be read: the caller reads the map
        assert time.monotonic() - started < 5
        assert bytes(held) == data[0][items[0].pieces[0][1] :][: items[0].pieces[0][2]]
        assert ahead.give_back(items[0].pieces[0])
        lent = ahead.take(items[2].pieces[1])  # the buffer is free again: later groups are lent
        assert lent is not None and bytes(lent) == data[1][items[2].pieces[1][1] :][: items[2].pieces[1][2]]
        assert ahead.give_back(items[2].pieces[1])
    finally:
        ahead.stop()


@pytest.mark.parametrize("method", ["task_arithmetic", "gta", "ties", "dare"])
def test_a_merge_reading_blocks_into_buffers_writes_the_same_bytes(tmp_path_factory, tmp_path, monkeypatch, method):
    """Row blocks small enough that every tensor is many blocks, each group read past the page
    cache: a row block per group for the methods that read each once (task arithmetic, gta), a
    whole tensor per group, read in several passes of row blocks, for the others (TIES, DARE).
    These files are small enough for the kernel's read of a header to bring all of one into the
    page cache, so the check that skips what it holds is off here; bf16: the fused kernels take
    the lent bytes as they are."""
    from streammerge.engine import shards
    from streammerge.methods import base as method_base
    from streammerge.recipe import Expert, Recipe

    toy = make_toy(str(tmp_path_factory.mktemp("toy_bf16")), "--preset", "tiny", "--experts", "3", "--dtype",
                   "bfloat16", "--shard-size", "60KB")  # fmt: skip
    if not takes_direct(tmp_path):
        pytest.skip("no O_DIRECT reads or page-cache eviction on this file system")
    monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(PageCache, "holds", lambda self, path, offset, length: False)
    readers = []

    class Recorded(ReadAhead):
        def start(self):
            readers.append(self)
            return super().start()

    monkeypatch.setattr(shards, "ReadAhead", Recorded)
    base = os.path.join(toy, "base")
    inputs = [os.path.join(m, f) for m in (base, *experts_of(toy)) for f in os.listdir(m)]

    def merge(out: str, direct: bool) -> dict[str, str]:
        monkeypatch.setattr(prefetch, "DIRECT", direct)
        assert evict(*inputs)
        recipe = Recipe(method, base, tuple(Expert(e, weight=w) for e, w in zip(experts_of(toy), (0.5, 1.0, -0.25))),
                        out, shard_size="30KB")  # fmt: skip
        return merge_hashes(recipe)

    assert merge(str(tmp_path / "direct"), True) == merge(str(tmp_path / "mapped"), False)
    direct = [r for r in readers if r.ring]
    assert direct, "no read-ahead with buffers"
    assert all(r.direct_bytes == sum(i.nbytes for i in r.items if i.direct) > 0 for r in direct)  # every group lent
    assert all(r.ring <= 2 * max(i.span for i in r.items if i.direct) for r in direct)
    assert all(i.whole == (method in ("ties", "dare")) for r in direct for i in r.items if i.direct)


def test_the_plan_counts_the_buffers_and_drops_them_where_they_do_not_fit(toy_untied, tmp_path, monkeypatch):
    from streammerge.engine import Merge, RunOptions
    from streammerge.methods import base as method_base
    from streammerge.recipe import Expert, Recipe

    monkeypatch.setattr(prefetch, "DIRECT", True)
    monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 1000)
    base = os.path.join(toy_untied, "base")

    def plan(method: str, max_ram: int | None = None, **params):
        experts = tuple(Expert(e) for e in experts_of(toy_untied))
        recipe = Recipe(method, base, experts, str(tmp_path / method), parameters=params)
        m = Merge(recipe, RunOptions(device="cpu", quiet=True, max_ram=max_ram))
        try:
            return m.plan
        finally:
            m.close()

    ta = plan("task_arithmetic")
    assert ta.read_buffers > 0
    # TIES passes over each tensor more than once: a whole tensor from each of the four inputs per
    # buffer, the embedding the largest
    from streammerge.io.checkpoint import Checkpoint

    ck = Checkpoint.open(base)
    embed = ck.info("model.embed_tokens.weight").nbytes
    ck.close()
    assert 4 * embed <= plan("ties").read_buffers <= 2 * 4 * (embed + 2 * 4096)
    # statistics passes read every input through the page cache before the merge, which then reads
    # in place what it holds: no buffers planned, none filled
    assert plan("ties", scope="model").read_buffers == 0
    tight = plan("task_arithmetic", max_ram=ta.peak_host - 1)
    assert tight.read_buffers == 0
    assert tight.peak_host - tight.baseline == ta.peak_host - ta.baseline - ta.read_buffers
    assert any("read-ahead's buffers" in n for n in tight.notes)


def test_a_model_that_is_the_base_and_an_expert_is_read_once(toy_untied):
    """mergekit's linear takes its base among the models: each group names those bytes once."""
    from streammerge.engine.inputs import plan_shards
    from streammerge.engine.reads import read_items
    from streammerge.io.checkpoint import Checkpoint

    first = experts_of(toy_untied)[0]
    base, experts = Checkpoint.open(first), [Checkpoint.open(e) for e in experts_of(toy_untied)]
    try:
        items = read_items(base, experts, plan_shards(base, None, 1 << 30), lambda name: True)
        assert items and all(i.direct for i in items)
        assert all(len(i.pieces) == len(experts) == len(set(i.pieces)) for i in items)
        assert {p[0] for i in items for p in i.pieces} == {f for e in experts for f in e.files}
    finally:
        for ck in (base, *experts):
            ck.close()


def test_rows_of_a_whole_tensor_are_lent_in_any_order_until_a_later_tensor_is_taken(cold_files):
    paths, data = cold_files
    tensors = [(5, 300_001), (300_006, 400_000), (700_006, SIZE - 700_006)]  # (offset, length)
    items = [ReadItem(tuple((p, a, n) for p in paths), True, whole=True) for a, n in tensors]
    ahead = ReadAhead(items, ring=sum(i.span for i in items[:2])).start()
    try:
        for a, n in tensors:
            for rows in [(a + n // 2, n - n // 2), (a, n // 2), (a + 7, 1000), (a + n // 2, n - n // 2)]:  # passes
                for k, path in enumerate(paths):
                    lent = ahead.take((path, *rows))
                    assert lent is not None and bytes(lent) == data[k][rows[0] : rows[0] + rows[1]]
                    assert ahead.give_back((path, *rows))
            assert ahead.take((paths[0], a + n - 10, 20)) is None  # past the tensor's end
        assert ahead.take((paths[0], *tensors[0])) is None  # a later tensor was taken: recycled
    finally:
        ahead.stop()
    assert ahead.direct_bytes == sum(i.nbytes for i in items)
