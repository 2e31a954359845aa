"""The safetensors container: header parsing with every check, header serialisation.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
Each tensor entry is {"dtype", "shape", "data_offsets": [begin, end]} relative to the data
section. We parse it ourselves (not via `safetensors`) so that a malformed file gives an
error naming the file and tensor instead of a crash, and so the parser can be fuzzed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import InputError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the safetensors library

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file: absolute byte offset and length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str]
    raw: bytes  # the 8-byte length plus JSON, for fingerprints
    data_start: int


def parse_header(prefix: bytes, file_size: int, path: str) -> Header:
    """Parse and validate a header from the file's first bytes (at least 8 + N of them).

    Raises InputError naming `path` (and the tensor) for every malformation: short file,
    oversized or non-JSON header, unknown dtype, bad shape, offsets past the end or overlapping.
    """
    if file_size < 8 or len(prefix) < 8:
        raise InputError(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise InputError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > file_size:
        raise InputError(f"{path}: truncated safetensors file (header of {n} bytes, file {file_size})")
    if len(prefix) < 8 + n:
        raise InputError(f"{path}: could not read the {n} byte header")
    try:
        doc = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, entry in doc.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise InputError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape
        ):
            raise InputError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InputError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise InputError(f"{where}: bad data_offsets {offsets!r}")
        if end > data_size:
            raise InputError(
                f"{where}: data ends at {end}, past the end of the file's data ({data_size} bytes); file truncated?"
            )
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise InputError(f"{where}: {end - begin} bytes for shape {shape} {dtype} (expected {expected})")
        entries.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin))
    entries.sort(key=lambda t: (t.offset, t.nbytes))
    for prev, cur in zip(entries, entries[1:]):
        if cur.offset < prev.offset + prev.nbytes and cur.nbytes and prev.nbytes:
            raise InputError(f"{path}: tensors {prev.name!r} and {cur.name!r} overlap")
    return Header({t.name: t for t in entries}, metadata, bytes(prefix[: 8 + n]), data_start)


def read_header(path: str) -> Header:
    """Read and parse the header of one safetensors file (reads only the header bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            first = f.read(8)
            if len(first) == 8:
                (n,) = struct.unpack("<Q", first)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    first += f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(first, size, path)


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Serialise a header for tensors laid out contiguously in the given order.

    Returns the header bytes (length prefix included, JSON padded with spaces to a multiple of
    8 so that the data section is aligned) and each tensor's offset within the data section.
    """
    doc: dict = {}
    if metadata:
        doc["__metadata__"] = metadata
    offsets, pos = [], 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
