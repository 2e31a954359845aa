"""PyTorch `pytorch_model.bin` checkpoints read the safe way: the tensor table is recovered from the
archive's pickle by an unpickler that builds nothing but tensor records (an allow-list, as
`torch.load(weights_only=True)` has), and each tensor is then read like a safetensors one, by byte
offset from a memory map — so the rest of the reader (checkpoint.py) is shared.

Format (torch.save since 1.6, the only one read here): a zip archive whose entries are stored
uncompressed: `<prefix>/data.pkl`, the pickled state dict, whose tensors refer by persistent id to
`<prefix>/data/<key>` (one entry per storage); a tensor is (storage, offset, size, stride). A
tensor that is not contiguous, a compressed entry, the pre-1.6 format, or a pickle that calls for
anything beyond tensors and ordered dicts is refused with one line naming the file.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .safetensors_format import Header, TensorInfo, itemsize

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
STORAGE_DTYPES = {  # torch's legacy storage class names, as torch.save writes them
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
MAX_PICKLE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_):
    return data


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _TableUnpickler(pickle.Unpickler):
    """Builds tensor records, ordered dicts and plain values; refuses every other global."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise InputError(
            f"{self.path}: its pickle calls for {module}.{name}, which a weights-only reader does not load; "
            "convert the checkpoint to safetensors"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise InputError(f"{self.path}: unknown persistent id {pid!r} in its pickle")
        kind = pid[1]
        if not isinstance(kind, _StorageType):
            raise InputError(f"{self.path}: storage of unsupported type {kind!r}")
        return _Storage(str(pid[2]), kind.dtype)


def _data_offset(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> int:
    """Where an entry's bytes start in the file: after its local header (whose name and extra
    field lengths may differ from the central directory's)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(f"{path}: entry {info.filename!r} is compressed; torch.save stores tensors uncompressed")
    fp = archive.fp
    assert fp is not None
    fp.seek(info.header_offset)
    local = fp.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: entry {info.filename!r} has no valid local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_bin_header(path: str) -> Header:
    """The tensor table of a torch.save checkpoint, as safetensors' Header (absolute offsets)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(
            f"{path}: not a zip archive (the pre-1.6 torch.save format, or not a checkpoint); convert it to safetensors"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with archive:
        entries = {i.filename: i for i in archive.infolist()}
        pkl = next((n for n in entries if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InputError(f"{path}: no data.pkl in the archive: not a torch.save checkpoint")
        if entries[pkl].file_size > MAX_PICKLE_BYTES:
            raise InputError(f"{path}: its data.pkl is {entries[pkl].file_size} bytes, past the limit")
        prefix = pkl[: -len("data.pkl")]
        raw = archive.read(pkl)
        try:
            table = _TableUnpickler(io.BytesIO(raw), path).load()
        except InputError:
            raise
        except Exception as exc:  # a malformed pickle: whatever it raises, one line
            raise InputError(f"{path}: its pickle cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(table, dict):
            raise InputError(f"{path}: holds a {type(table).__name__}, not a state dict of tensors")
        tensors: dict[str, TensorInfo] = {}
        for name, t in table.items():
            if not isinstance(t, _Tensor):
                raise InputError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            tensors[name] = _info(archive, entries, prefix, path, str(name), t)
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].offset))
    return Header(ordered, {"format": "pt"}, raw, 0)


def _info(archive, entries: dict, prefix: str, path: str, name: str, t: _Tensor) -> TensorInfo:
    entry = entries.get(f"{prefix}data/{t.storage.key}")
    if entry is None:
        raise InputError(f"{path}: tensor {name!r} refers to storage {t.storage.key!r}, which is not in the archive")
    contiguous, expect = True, 1
    for dim, stride in zip(reversed(t.shape), reversed(t.stride)):
        if dim != 1 and stride != expect:
            contiguous = False
        expect *= dim
    if not contiguous:
        raise InputError(f"{path}: tensor {name!r} is not contiguous (a view); save it with .contiguous()")
    size = itemsize(t.storage.dtype)
    nbytes = math.prod(t.shape) * size
    if (t.offset * size + nbytes) > entry.file_size:
        raise InputError(f"{path}: tensor {name!r} lies past the end of its storage")
    offset = _data_offset(archive, entry, path) + t.offset * size
    return TensorInfo(name, t.storage.dtype, t.shape, offset, nbytes)
