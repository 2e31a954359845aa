"""Fetch llama.cpp's own HF→GGUF converter, to compare streammerge's GGUF output against it
(tests/test_gguf_output.py): the `llama-cpp-python` source distribution from PyPI carries llama.cpp
under vendor/llama.cpp; only the converter and its gguf-py are kept, in bench/.llama-cpp/.

    python tools/llama_cpp_source.py      # prints the converter's path
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
import urllib.request

VERSION = "0.3.36"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "bench", ".llama-cpp")
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> str:
    return os.path.join(DEST, "convert_hf_to_gguf.py")


def main() -> int:
    if os.path.isfile(converter()):
        print(converter())
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = os.path.join(tmp, "sdist.tar.gz")
        try:  # PyPI's simple index (PEP 691) names the file; pip download would build its metadata (a minute)
            request = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as r:
                name = f"llama_cpp_python-{VERSION}.tar.gz"
                (url,) = [f["url"] for f in json.load(r)["files"] if f["filename"] == name]
            urllib.request.urlretrieve(url, sdist)
        except (OSError, ValueError) as exc:
            print(f"cannot download llama-cpp-python {VERSION}: {exc}", file=sys.stderr)
            return 1
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and m.name[len(prefix) :].startswith(KEEP)]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(DEST, members=members, filter="data")
    print(converter())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
