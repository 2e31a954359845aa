"""The house's contracts, read from the source: imports flow one way (no cycles, no module
importing from a layer above its own, imports inside functions counted too), engine modules stay
small, no class grows past ~200 lines, and the package list in pyproject.toml ships every package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "streammerge")

# Top to bottom: a module may import from its own layer (without a cycle) or from layers below.
# A name ending in ".*" stands for every module below that package not named elsewhere.
LAYERS = [
    ["streammerge.console"],  # the command's entry point: imports cli once it can answer Ctrl-C
    ["streammerge.cli"],
    ["streammerge", "streammerge.api"],
    ["streammerge.adapter_output", "streammerge.verify", "streammerge.lora_output", "streammerge.gguf_output"],
    ["streammerge.engine"],
    ["streammerge.engine.run"],
    ["streammerge.engine.ray"],
    ["streammerge.engine.shards"],
    ["streammerge.engine.statistics"],
    ["streammerge.engine.tensors", "streammerge.engine.output", "streammerge.engine.estimate"],
    ["streammerge.engine.placement"],
    ["streammerge.engine.reads"],
    ["streammerge.engine.inputs", "streammerge.engine.remote"],
    ["streammerge.engine.options"],
    ["streammerge.report", "streammerge.output_files", "streammerge.gguf_vocab"],
    ["streammerge.recipe_files"],
    ["streammerge.mergekit_recipe"],
    ["streammerge.recipe"],
    ["streammerge.methods"],
    ["streammerge.methods.orthomerge"],
    ["streammerge.methods.registry"],
    ["streammerge.methods.*"],
    ["streammerge.methods.spectral_common"],
    ["streammerge.methods.base"],
    ["streammerge.plan", "streammerge.prefetch", "streammerge.memwatch", "streammerge.cpu", "streammerge.allocator"],
    ["streammerge.io", "streammerge.io.*"],
    [
        "streammerge.settings",
        "streammerge.units",
        "streammerge.errors",
        "streammerge.gguf_pre",
        "streammerge.quality_marks",
    ],
    ["streammerge.math", "streammerge.math.*"],
]
ENGINE_MODULE_MAX_LINES = 250
CLASS_MAX_LINES = 200


def modules() -> dict[str, str]:
    """Module name → file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from x import y`: y is a submodule where one exists, else a name in x
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a name inside a module: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def layer_of(module: str) -> int:
    exact = [i for i, layer in enumerate(LAYERS) if module in layer]
    if exact:
        return exact[0]
    wild = [
        (len(p), i) for i, layer in enumerate(LAYERS) for p in layer if p.endswith(".*") and module.startswith(p[:-1])
    ]
    assert wild, f"{module} is in no layer of tests/test_architecture.py: add it where it belongs"
    return max(wild)[1]


def test_imports_flow_one_way():
    g = graph()
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in g.items()
        for b in targets
        if layer_of(b) < layer_of(a)
    ]
    assert not upward, "imports running up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_math_imports_nothing_above_itself():
    g = graph()
    outside = {(a, b) for a, t in g.items() if a.startswith("streammerge.math") for b in t}
    assert all(b.startswith("streammerge.math") for _, b in outside), sorted(outside)


def test_the_contract_test_sees_a_violation(tmp_path):
    """The checks above would fail on an upward import inside a function."""
    known = {"streammerge.math.cayley", "streammerge.engine.run", "streammerge.engine"}
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..engine import run\n")
    assert imports_of("streammerge.math.probe", str(path), known) == {"streammerge.engine.run"}
    assert layer_of("streammerge.engine.run") < layer_of("streammerge.math.cayley")


def test_engine_modules_and_classes_stay_small():
    too_long = []
    for name, path in modules().items():
        source = open(path, encoding="utf-8").read()
        lines = source.count("\n")
        if name.startswith("streammerge.engine") and lines > ENGINE_MODULE_MAX_LINES:
            too_long.append(f"{name}: {lines} lines (engine modules ≤ {ENGINE_MODULE_MAX_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_MAX_LINES:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines (≤ {CLASS_MAX_LINES})")
    assert not too_long, "\n".join(too_long)


def test_the_engine_knows_no_method_by_name():
    from streammerge.methods import method_names

    names = set(method_names())
    found = []
    for name, path in modules().items():
        if not name.startswith("streammerge.engine"):
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found, found


@pytest.mark.slow
def test_the_wheel_ships_every_package(tmp_path):
    """pyproject.toml lists packages explicitly: a package missing there would not ship."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert set(modules()) <= shipped, sorted(set(modules()) - shipped)
    # and the engine imports from the wheel alone, not from this checkout
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(tmp_path / wheel).extractall(unpacked)
    code = "import streammerge.engine, streammerge.cli; print(streammerge.engine.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(unpacked)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(str(unpacked)), r.stdout
