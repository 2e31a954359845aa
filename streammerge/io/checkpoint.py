"""A Hugging Face model folder read lazily: tensor names in file order, one tensor at a time.

    ckpt = Checkpoint.open("./base")
    for name in ckpt.names(): t = ckpt.get(name)   # float32 copy; nothing else stays resident

Tensors are memory-mapped; after each copy the mapped pages are released from this process
(madvise DONTNEED), so page cache from inputs never counts as our resident memory. Where a
read-ahead thread has read a tensor's bytes into a buffer of its own (`reader`, prefetch.py),
`view` lends those instead, until `release`.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .safetensors_format import DTYPES, Header, TensorInfo, read_header
from .torch_bin import BIN_INDEX_NAME, BIN_NAME, read_bin_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PAGE = mmap.PAGESIZE
MAX_JSON_BYTES = 64 * 1024 * 1024


def file_identity(path: str) -> dict:
    """What says a file is the one seen before without reading it: size, mtime (ns) and inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def load_json(path: str) -> object:
    """json.load with duplicate keys refused and every failure an InputError naming the file."""

    def no_duplicates(pairs: list) -> dict:
        counts = Counter(k for k, _ in pairs)
        dups = [k for k, c in counts.items() if c > 1]
        if dups:
            raise InputError(f"{path}: key {dups[0]!r} appears more than once")
        return dict(pairs)

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{path}: larger than {MAX_JSON_BYTES} bytes; not a JSON file for a model folder")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


@dataclass
class Checkpoint:
    """One model folder: its shard files (in order) and every tensor's location."""

    folder: str
    files: list[str]
    headers: dict[str, Header]
    locations: dict[str, tuple[str, TensorInfo]]  # name -> (file, info), in file/offset order
    _maps: dict[str, mmap.mmap] = field(default_factory=dict, repr=False)
    reader: Any = field(default=None, repr=False)  # prefetch.ReadAhead lending bytes it read, or None

    @classmethod
    def open(cls, folder: str) -> "Checkpoint":
        folder = os.path.abspath(folder)
        if not os.path.exists(folder):
            raise InputError(f"{folder}: no such folder")
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: not a folder (a model is a folder of safetensors files)")
        index_path = os.path.join(folder, INDEX_NAME)
        single_path = os.path.join(folder, SINGLE_NAME)
        if not os.path.exists(index_path) and not os.path.exists(single_path):
            # a pytorch_model.bin checkpoint (sharded or not), read without unpickling (torch_bin.py)
            if os.path.exists(os.path.join(folder, BIN_INDEX_NAME)):
                index_path = os.path.join(folder, BIN_INDEX_NAME)
            elif os.path.exists(os.path.join(folder, BIN_NAME)):
                single_path = os.path.join(folder, BIN_NAME)
        if os.path.exists(index_path):
            index = load_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index_path}: no 'weight_map' object of tensor name -> file name")
            names = sorted(set(weight_map.values()))
            for n in names:
                if os.path.basename(n) != n:
                    raise InputError(f"{index_path}: shard name {n!r} is not a plain file name")
            files = [os.path.join(folder, n) for n in names]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise InputError(f"{index_path}: names shard {os.path.basename(missing[0])!r}, which is missing")
        elif os.path.exists(single_path):
            weight_map, files = None, [single_path]
        else:
            raise InputError(f"{folder}: no {SINGLE_NAME}, {INDEX_NAME}, {BIN_NAME} or {BIN_INDEX_NAME}")
        return cls._from_files(folder, files, weight_map, index_path)

    @classmethod
    def open_file(cls, path: str) -> "Checkpoint":
        """One safetensors file of any name (an adapter, say), read the same lazy way."""
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        return cls._from_files(os.path.dirname(path), [path], None, "")

    @classmethod
    def _from_files(cls, folder: str, files: list[str], weight_map: dict | None, index_path: str) -> "Checkpoint":
        headers = {f: read_bin_header(f) if f.endswith(".bin") else read_header(f) for f in files}
        locations: dict[str, tuple[str, TensorInfo]] = {}
        for f in files:
            for name, info in headers[f].tensors.items():
                if name in locations:
                    raise InputError(f"{f}: tensor {name!r} also in {locations[name][0]}")
                if weight_map is not None and weight_map.get(name) != os.path.basename(f):
                    raise InputError(f"{f}: tensor {name!r} is not listed for this file in {INDEX_NAME}")
                locations[name] = (f, info)
        if weight_map is not None:
            absent = [n for n in weight_map if n not in locations]
            if absent:
                raise InputError(f"{index_path}: tensor {absent[0]!r} is listed but not in {weight_map[absent[0]]}")
        if not locations:
            raise InputError(f"{folder}: holds no tensors")
        return cls(folder, files, headers, locations)

    def names(self) -> list[str]:
        return list(self.locations)

    def info(self, name: str) -> TensorInfo:
        return self.locations[name][1]

    def file_of(self, name: str) -> str:
        return self.locations[name][0]

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """A fresh copy of tensor `name` (or of its rows [start, stop) along dim 0) in `dtype` on
        `device` (None keeps the stored dtype)."""
        raw = self.view(name, rows)
        dtype = dtype or raw.dtype
        if torch.device(device).type != "cpu" and dtype != raw.dtype:
            # move, then convert there: torch converts a blocking host-to-device copy on the host,
            # which would put a float32 copy of the tensor in RAM
            out = raw.to(device=device, copy=True).to(dtype)
        else:
            out = raw.to(device=device, dtype=dtype, copy=True)
        del raw
        self.release(name, rows)
        return out

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (its rows [start, stop) along dim 0) as stored, read in place from the
        file's map (or from the read-ahead's buffer, where it read these bytes): no copy,
        read-only by contract (the map is private, so a write would go to anonymous memory, never
        to the file). Valid until `release`: the buffer is then reused for other bytes."""
        path, info = self.locations[name]
        key = self.piece(name, rows)
        lent = self.reader.take(key) if self.reader is not None and key[2] else None
        if lent is not None:
            shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
            return torch.frombuffer(lent, dtype=torch.uint8).view(DTYPES[info.dtype]).reshape(shape)
        raw = self._read(path, info)
        return raw if rows is None else raw[rows[0] : rows[1]]

    def piece(self, name: str, rows: tuple[int, int] | None = None) -> tuple[str, int, int]:
        """(file, offset, length) of tensor `name`'s bytes (its rows [start, stop) along dim 0)."""
        path, info = self.locations[name]
        if rows is None:
            return path, info.offset, info.nbytes
        row_bytes = info.nbytes // max(1, info.shape[0])
        return path, info.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Unmap the pages of tensor `name` (its rows) from this process, where `view` or `get`
        mapped them: the page cache keeps them, this process's resident size no longer counts them."""
        path, info = self.locations[name]
        key = self.piece(name, rows)
        if self.reader is not None and self.reader.give_back(key):
            return
        self._release(path, info, key[1] - info.offset, key[2])

    def _read(self, path: str, info: TensorInfo) -> torch.Tensor:
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._maps.get(path)
        if mm is None:
            try:
                with open(path, "rb") as f:
                    # ACCESS_COPY gives a writable (private) view that torch accepts without a
                    # warning; nothing writes to it, so no anonymous pages are created.
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot map ({exc})") from None
            self._maps[path] = mm
        if info.offset + info.nbytes > len(mm):
            raise InputError(f"{path}: tensor {info.name!r} lies past the end of the file (changed during the merge?)")
        try:
            flat = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
            return flat.view(dtype).reshape(info.shape)
        except (RuntimeError, OSError) as exc:
            raise InputError(f"{path}: tensor {info.name!r}: cannot read ({exc})") from None

    def _release(self, path: str, info: TensorInfo, skip: int, nbytes: int) -> None:
        """Drop the mapped pages of bytes [skip, skip + nbytes) of the tensor from this process."""
        mm = self._maps.get(path)
        if mm is None or nbytes <= 0:
            return
        begin = info.offset + skip
        start = begin - begin % _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm) - start, begin + nbytes - start))
        except (OSError, ValueError, AttributeError):
            pass  # an optimisation only

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a tensor view is still alive; the map goes when it does
        self._maps.clear()

    def fingerprint(self) -> dict:
        """Per input file: size, modification time and inode (rsync's quick check: a file saved
        over with other values of the same shapes changes them) and the digest of its header."""
        import hashlib

        return {
            f: file_identity(f) | {"header_sha256": hashlib.sha256(self.headers[f].raw).hexdigest()} for f in self.files
        }
