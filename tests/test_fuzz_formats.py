"""Hypothesis fuzzing of the safetensors header and index parsing: any input either parses into
something consistent or raises InputError naming the file — no other exception, no hang, no
allocation driven by a size field."""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.errors import InputError
from streammerge.io.checkpoint import Checkpoint
from streammerge.io.safetensors_format import DTYPES, parse_header

PATH = "fuzz.safetensors"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPES)) | st.text(max_size=4),
        "shape": st.lists(st.integers(-2, 40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-5, 400), min_size=2, max_size=2) | json_values,
    }
)


def check(prefix: bytes, file_size: int) -> None:
    try:
        header = parse_header(prefix, file_size, PATH)
    except InputError as exc:
        assert str(exc).startswith(PATH)
        return
    spans = sorted((t.offset, t.offset + t.nbytes) for t in header.tensors.values() if t.nbytes)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0  # no overlap
    for t in header.tensors.values():
        assert header.data_start <= t.offset and t.offset + t.nbytes <= file_size


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 10**6))
def test_random_bytes_never_crash_the_header_parser(data, extra):
    check(data, len(data) + extra)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(min_size=1, max_size=6), entries | json_values, max_size=5),
    st.integers(0, 500),
    st.integers(-3, 3),
)
def test_structured_headers_parse_consistently_or_fail_cleanly(doc, data_size, length_skew):
    body = json.dumps(doc).encode()
    prefix = struct.pack("<Q", max(0, len(body) + length_skew)) + body
    check(prefix, len(prefix) + data_size)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    json_values
    | st.fixed_dictionaries(
        {"weight_map": st.dictionaries(st.text(max_size=6), json_values | st.text(max_size=12), max_size=4)}
    )
)
def test_random_index_files_fail_cleanly(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("idx")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    try:
        Checkpoint.open(str(folder))
    except InputError as exc:
        assert str(folder) in str(exc)
    else:
        raise AssertionError("an index naming no existing shard cannot open")
