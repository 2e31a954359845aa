"""io/direct.py: an output file written with O_DIRECT holds the same bytes as one written through
the page cache, across buffer boundaries, partial blocks, durable points (checkpoints), continuing
at an offset (resume), and falling back when the device refuses direct writes part-way."""

from __future__ import annotations

import errno
import os
import random

import pytest

from streammerge.io import direct
from streammerge.io.direct import ALIGN, WRITE_BUFFER, OutputFile

from tests.conftest import experts_of, merge_hashes


def supports_direct(folder) -> bool:
    """Whether this folder's filesystem takes O_DIRECT writes (tmpfs on older kernels does not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(folder, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.remove(path)
    return True


def chunks(seed: int) -> list[bytes]:
    """Pieces of every awkward size: empty, one byte, just under and over a block and the buffer."""
    rng = random.Random(seed)
    sizes = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, WRITE_BUFFER - 3, WRITE_BUFFER + 5, 3 * WRITE_BUFFER + 17]
    sizes += [rng.randrange(1, 200_000) for _ in range(20)]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes]


def test_direct_file_has_the_buffered_bytes_through_syncs_and_resumes(tmp_path):
    pieces = chunks(0)
    expected = b"".join(pieces)
    path = str(tmp_path / "direct.bin")
    f = OutputFile(path)
    assert f.direct == supports_direct(tmp_path)  # direct wherever the filesystem takes it
    written = 0
    for k, piece in enumerate(pieces):
        f.write(piece)
        written += len(piece)
        if k % 5 == 4:  # a checkpoint: durable up to here, the size it reports
            assert f.sync() == written and os.path.getsize(path) == written
        if k % 9 == 8:  # an interrupt after a checkpoint: continue the file where it was made durable
            durable = f.sync()
            f.write(b"lost when interrupted" * 300)
            f.close()
            f = OutputFile(path, durable)
    assert f.sync() == len(expected)
    f.close()
    assert open(path, "rb").read() == expected


def test_a_late_refusal_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """A device that refuses direct writes after the open (larger blocks than ALIGN): the file goes
    on through the page cache, with what the device already holds kept."""
    if not supports_direct(tmp_path):
        pytest.skip("this filesystem takes no O_DIRECT writes")
    real_pwrite, calls = os.pwrite, {"n": 0}

    def refusing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    pieces = chunks(1)
    path = str(tmp_path / "fallback.bin")
    f = OutputFile(path)
    for piece in pieces:
        f.write(piece)
    assert not f.direct and calls["n"] == 3
    f.sync()
    f.close()
    assert open(path, "rb").read() == b"".join(pieces)


def test_merge_output_is_the_same_written_directly_or_not(toy_untied, tmp_path, monkeypatch):
    from streammerge.recipe import Expert, Recipe

    def merge(out: str, use_direct: bool) -> dict[str, str]:
        monkeypatch.setattr(direct, "USE_DIRECT", use_direct)
        base = os.path.join(toy_untied, "base")
        return merge_hashes(Recipe("ties", base, tuple(Expert(e) for e in experts_of(toy_untied)), out,
                                   shard_size="30KB"))  # fmt: skip

    assert merge(str(tmp_path / "direct"), True) == merge(str(tmp_path / "buffered"), False)
