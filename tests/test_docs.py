"""The docs stay true to the tool: every method `streammerge methods` lists has a section in the
methods reference, every relative link in README.md and docs/ resolves (file and heading), and the
test command the README gives is the one CI runs."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[str]:
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "results", "README.md")]
    docs = os.path.join(ROOT, "docs")
    files += [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    return files


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
    out = set()
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def test_every_listed_method_has_a_section_in_the_methods_reference():
    from streammerge.methods import method_names

    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    headings = set(re.findall(r"^#{2,3} `(\w+)`$", text, flags=re.M))
    missing = [m for m in method_names() if m not in headings]
    assert not missing, f"docs/methods.md has no section for {missing}"


def test_relative_links_resolve():
    broken = []
    for path in markdown_files():
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = os.path.relpath(path, ROOT)
            if not os.path.exists(resolved):
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{where}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [there](missing.md) and [here](#title) and [gone](#nowhere).\n")
    targets = LINK.findall(page.read_text())
    assert targets == ["missing.md", "#title", "#nowhere"]
    assert "title" in anchors(str(page)) and "nowhere" not in anchors(str(page))


def test_ci_runs_the_test_command_the_readme_gives():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    command = re.search(r"^(bash tools/run_tests\.sh)\b", readme, flags=re.M)
    assert command, "README.md gives no test command"
    assert command.group(1) in ci


def test_readme_stays_a_front_door():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move the detail to docs/"


def parameters_line(name: str) -> str:
    """The line docs/methods.md gives a method's parameters and per-expert values, from the code."""
    import dataclasses

    from streammerge.methods import REGISTRY, REQUIRED

    def shown(v) -> str:
        return "required" if v is REQUIRED or v is dataclasses.MISSING else f"`{v!r}`"

    method = REGISTRY[name]
    params = []
    for f in dataclasses.fields(method.params_type):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)  # type: ignore[misc]  # fmt: skip
        key = f.name.rstrip("_")
        params.append(f"`{key}` (required)" if default is dataclasses.MISSING else f"`{key}` = {shown(default)}")
    per = [f"`{k}` (required)" if v is REQUIRED else f"`{k}` = {shown(v)}" for k, v in method.expert_params.items()]
    return f"**Parameters** (defaults): {', '.join(params) or 'none'}. **Per expert:** {', '.join(per) or 'none'}."


def test_the_methods_reference_states_each_methods_parameters_as_the_code_has_them():
    from streammerge.methods import REGISTRY

    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    stale = [name for name in REGISTRY if parameters_line(name) not in text]
    assert not stale, f"docs/methods.md: parameters of {stale} differ from the code"
