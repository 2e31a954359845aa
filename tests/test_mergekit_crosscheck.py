"""The same mergekit recipes merged by mergekit 0.1.5 itself and by streammerge, tensor by tensor.

mergekit is found in this order: $MERGEKIT_PYTHON, this interpreter (pip install -e ".[mergekit]"),
bench/.venv-mergekit (made by tools/mergekit_env.py, which tools/run_tests.sh runs); without it
every test here skips with a message. All cases run in one mergekit process (tools/run_mergekit.py) at the start.

What "agree" means per case: `exact` — every entry equal to 1e-6 of the largest input magnitude there
(float32 summation order; both tools compute in float32: the recipes say `dtype: float32`); `bf16` —
mergekit computes in bfloat16, we in float32: every entry within 4 bf16 steps of the largest magnitude
among the results and inputs there; `tie_rate` — merged here with `--param tie_break=mergekit`
(mergekit's own sort, whose choice among entries tied at a threshold depends on the machine:
bench/results/tie-order.md; our default keeps the earliest), at most 0.1 % of the entries differ;
`l1` — random masks (ours are seeded, mergekit's are not) agree in distribution: the task
vector's L1 norm within 10 % per large tensor; `refused` — both tools refuse the recipe.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from streammerge import settings
from streammerge.cli import main
from streammerge.errors import UsageError
from tests.conftest import ROOT, load_all, make_toy

VENV_PYTHON = os.path.join(ROOT, "bench", ".venv-mergekit", "bin", "python")


def mergekit_python() -> str | None:
    if os.environ.get("MERGEKIT_PYTHON"):
        return os.environ["MERGEKIT_PYTHON"]
    if importlib.util.find_spec("mergekit") is not None:
        return sys.executable
    return VENV_PYTHON if os.path.exists(VENV_PYTHON) else None


def m(path: str, **params) -> dict:
    return {"model": path, "parameters": params} if params else {"model": path}


def cases(b: str, e1: str, e2: str, e3: str) -> dict[str, tuple[dict, str]]:
    f32 = {"dtype": "float32"}
    three = [m(e1, weight=1.0), m(e2, weight=0.5), m(e3, weight=1.0)]
    return {
        # C1: the base listed among linear's models is averaged with its weight
        "linear_base_listed": (
            {
                "merge_method": "linear",
                "base_model": b,
                "models": [m(b, weight=1.0), m(e1, weight=0.5), m(e2, weight=2.0)],
            }
            | f32,
            "exact",
        ),
        "linear_not_normalized": (
            {
                "merge_method": "linear",
                "models": [m(e1, weight=0.3), m(e2, weight=0.5)],
                "parameters": {"normalize": False},
            }
            | f32,
            "exact",
        ),
        "linear_global_weight": (
            {
                "merge_method": "linear",
                "base_model": b,
                "models": [m(e1), m(e2, weight=3.0)],
                "parameters": {"weight": 1.0},
            }
            | f32,
            "exact",
        ),
        "task_arithmetic_negative": (
            {
                "merge_method": "task_arithmetic",
                "base_model": b,
                "models": [m(e1, weight=1.0), m(e2, weight=-0.4)],
                "parameters": {"lambda": 0.7},
            }
            | f32,
            "exact",
        ),
        "task_arithmetic_normalize": (
            {"merge_method": "task_arithmetic", "base_model": b, "models": three, "parameters": {"normalize": True}}
            | f32,
            "exact",
        ),
        # C4: no density means 1.0 (no trimming); C5: the disjoint mean divides by the agreeing weights
        "ties_no_density": ({"merge_method": "ties", "base_model": b, "models": [m(b)] + three} | f32, "exact"),
        "ties_density": (
            {"merge_method": "ties", "base_model": b, "models": three, "parameters": {"density": 0.3}} | f32,
            "tie_rate",
        ),
        "ties_sum_lambda": (
            {
                "merge_method": "ties",
                "base_model": b,
                "models": three,
                "parameters": {"density": 0.5, "normalize": False, "lambda": 1.2},
            }
            | f32,
            "tie_rate",
        ),
        # gradients and filters
        "ties_gradient_filter": (
            {
                "merge_method": "ties",
                "base_model": b,
                "models": [
                    m(e1, weight=[{"filter": "mlp", "value": 0.3}, {"value": 1.0}], density=[0.2, 0.8]),
                    m(e2, weight=1.0, density=[{"filter": "self_attn", "value": [0.9, 0.1]}, {"value": 0.5}]),
                    m(e3, weight=0.7),
                ],
                "parameters": {"density": 0.6},
            }
            | f32,
            "tie_rate",
        ),
        "breadcrumbs": (
            {
                "merge_method": "breadcrumbs",
                "base_model": b,
                "models": three,
                "parameters": {"density": 0.5, "gamma": 0.05},
            }
            | f32,
            "tie_rate",
        ),
        "breadcrumbs_ties_rescale": (
            {
                "merge_method": "breadcrumbs_ties",
                "base_model": b,
                "models": three,
                "parameters": {"density": 0.4, "rescale": True},
            }
            | f32,
            "tie_rate",
        ),
        # C2/C3: DARE's normalize defaults (false) and normalize: true, at density 1 (no random mask)
        "dare_ties_default": ({"merge_method": "dare_ties", "base_model": b, "models": three} | f32, "exact"),
        "dare_linear_normalize": (
            {"merge_method": "dare_linear", "base_model": b, "models": three, "parameters": {"normalize": True}} | f32,
            "exact",
        ),
        "della_density_1": ({"merge_method": "della", "base_model": b, "models": three} | f32, "exact"),
        # random masks: the same in distribution
        "dare_ties_random": (
            {"merge_method": "dare_ties", "base_model": b, "models": three, "parameters": {"density": 0.4}} | f32,
            "l1",
        ),
        "dare_linear_random": (
            {
                "merge_method": "dare_linear",
                "base_model": b,
                "models": three,
                "parameters": {"density": 0.3, "normalize": True},
            }
            | f32,
            "l1",
        ),
        "della_random": (
            {
                "merge_method": "della_linear",
                "base_model": b,
                "models": three,
                "parameters": {"density": 0.5, "epsilon": 0.1},
            }
            | f32,
            "l1",
        ),
        # mergekit computes in bfloat16 when the recipe names no dtype; we in float32
        "task_arithmetic_bf16": ({"merge_method": "task_arithmetic", "base_model": b, "models": three}, "bf16"),
        "linear_out_dtype": (
            {
                "merge_method": "linear",
                "models": [m(e1, weight=1.0), m(e2, weight=1.0)],
                "dtype": "float32",
                "out_dtype": "bfloat16",
            },
            "bf16",
        ),
        # the other methods mergekit users reach for
        "slerp_gradient": (
            {"merge_method": "slerp", "base_model": b, "models": [m(b), m(e1)], "parameters": {"t": [0.1, 0.9]}} | f32,
            "exact",
        ),
        "slerp_filtered": (
            {
                "merge_method": "slerp",
                "base_model": b,
                "models": [m(e1)],
                "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
            }
            | f32,
            "exact",
        ),
        "nuslerp_with_base": (
            {"merge_method": "nuslerp", "base_model": b, "models": [m(e1, weight=1.0), m(e2, weight=3.0)]} | f32,
            "exact",
        ),
        "nuslerp_rowwise_no_base": (
            {
                "merge_method": "nuslerp",
                "models": [m(e1, weight=1.0), m(e2, weight=0.5)],
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            }
            | f32,
            "exact",
        ),
        "multislerp_with_base": ({"merge_method": "multislerp", "base_model": b, "models": three} | f32, "exact"),
        "multislerp_no_base": (
            {"merge_method": "multislerp", "models": three, "parameters": {"normalize_weights": False}} | f32,
            "exact",
        ),
        "karcher_base_added": ({"merge_method": "karcher", "base_model": b, "models": [m(e1), m(e2)]} | f32, "exact"),
        # typed scalars (#25.8): an int and a float parameter of one method
        "karcher_max_iter": (
            {"merge_method": "karcher", "models": [m(e1), m(e2), m(e3)], "parameters": {"max_iter": 3, "tol": 1e-3}}
            | f32,
            "exact",
        ),
        # typed gradients (#25.8): each entry read as the parameter's type first, so an int gradient
        # interpolates to whole numbers, "1e-3" is a number for a float, and words are booleans that pick
        "karcher_typed_gradient": (
            {
                "merge_method": "karcher",
                "models": [m(e1), m(e2)],
                "parameters": {"max_iter": [2, "6"], "tol": ["1e-3", 0.01]},
            }
            | f32,
            "exact",
        ),  # fmt: skip
        "nuslerp_bool_gradient": (
            {
                "merge_method": "nuslerp",
                "models": [m(e1, weight="1"), m(e2, weight=0.5)],
                "parameters": {"nuslerp_flatten": ["off", 1], "nuslerp_row_wise": ["yes", "no"]},
            }
            | f32,
            "exact",
        ),  # fmt: skip
        "model_stock": (
            {"merge_method": "model_stock", "base_model": b, "models": [m(e1), m(e2), m(e3)]} | f32,
            "exact",
        ),
        "model_stock_filter_wise": (
            {
                "merge_method": "model_stock",
                "base_model": b,
                "models": [m(e1), m(e2)],
                "parameters": {"filter_wise": True},
            }
            | f32,
            "exact",
        ),
        "sce": ({"merge_method": "sce", "base_model": b, "models": [m(e1), m(e2), m(e3)]} | f32, "exact"),
        "sce_topk": (
            {
                "merge_method": "sce",
                "base_model": b,
                "models": [m(e1), m(e2), m(e3)],
                "parameters": {"select_topk": 0.4},
            }
            | f32,
            "tie_rate",
        ),
        "nearswap": (
            {"merge_method": "nearswap", "base_model": b, "models": [m(e1)], "parameters": {"t": 0.002}} | f32,
            "exact",
        ),
        "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": b, "models": [m(b), m(e1)]} | f32, "exact"),
        "passthrough_slices": (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": e1, "layer_range": [0, 2]}]},
                    {
                        "sources": [
                            {
                                "model": e2,
                                "layer_range": [1, 2],
                                "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                            }
                        ]
                    },
                    {"sources": [{"model": b, "layer_range": [0, 1]}], "parameters": {"scale": 0.25}},
                ],
            }
            | f32,
            "exact",
        ),
        "passthrough_model_scaled": ({"merge_method": "passthrough", "models": [m(e1, scale=0.5)]} | f32, "exact"),
        # RAM (#25.8): ε = 0.003, about the median |τ|: a third of the entries changed by one expert, a third by 2-3
        "ram_default": ({"merge_method": "ram", "base_model": b, "models": [m(e1), m(e2), m(e3)]} | f32, "exact"),
        "ram_epsilon": (
            {"merge_method": "ram", "base_model": b, "models": [m(e1), m(e2), m(e3)], "parameters": {"epsilon": 0.003}}
            | f32,
            "exact",
        ),
        "ramplus_tl": (
            {
                "merge_method": "ramplus_tl",
                "base_model": b,
                "models": [m(b), m(e1), m(e2), m(e3)],
                "parameters": {"epsilon": 0.003, "r": 0.5, "alpha": 0.3},
            }
            | f32,
            "exact",
        ),
        # refused by both
        "ties_weight_missing": (
            {"merge_method": "ties", "base_model": b, "models": [m(e1), m(e2, weight=1.0)]},
            "refused",
        ),
        "linear_base_unweighted": (
            {"merge_method": "linear", "base_model": b, "models": [m(e1, weight=1.0)]},
            "refused",
        ),
        "slerp_without_t": ({"merge_method": "slerp", "base_model": b, "models": [m(e1)]}, "refused"),
        "slerp_two_experts": (
            {"merge_method": "slerp", "base_model": b, "models": [m(e1), m(e2)], "parameters": {"t": 0.5}},
            "refused",
        ),
        "model_stock_one_expert": (
            {"merge_method": "model_stock", "base_model": b, "models": [m(b), m(e1)]},
            "refused",
        ),
    }


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
    python = mergekit_python()
    if python is None:
        pytest.skip(
            "mergekit 0.1.5 is not installed (python tools/mergekit_env.py, pip install -e '.[mergekit]', or set "
            "MERGEKIT_PYTHON): cross-check skipped"
        )
    work = tmp_path_factory.mktemp("mergekit")
    toy = make_toy(str(work / "toy"), "--preset", "tiny", "--experts", "3", "--shared", "0.5", "--shard-size", "60KB")
    b, e1, e2, e3 = (os.path.join(toy, d) for d in ("base", "expert-1", "expert-2", "expert-3"))
    table = cases(b, e1, e2, e3)
    todo = []
    for name, (doc, _) in table.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        todo.append({"recipe": str(path), "out": str(work / "mk" / name)})
    (work / "cases.json").write_text(json.dumps(todo))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [python, os.path.join(ROOT, "tools", "run_mergekit.py"), str(work / "cases.json"), str(work / "results.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if r.returncode != 0 and "No module named 'mergekit'" in r.stderr:
        pytest.skip(f"{python} has no mergekit: cross-check skipped")
    assert r.returncode == 0, r.stderr[-3000:]
    results = dict(zip(table, json.loads((work / "results.json").read_text())))
    return work, b, table, results


def ours(work, name: str, *extra: str):
    out = str(work / "sm" / (name + "".join(extra).replace("=", "-")))
    r = CliRunner().invoke(
        main, ["merge", "--quiet", "--device", "cpu", "--recipe", str(work / f"{name}.yaml"), "--out", out, *extra]
    )
    return r, out


def task_l1(t: torch.Tensor, base: torch.Tensor) -> float:
    return float((t.double() - base.double()).abs().sum())


@pytest.mark.parametrize("name", list(cases("b", "e1", "e2", "e3")))
def test_same_recipe_same_weights_as_mergekit(crosscheck, name):
    work, base_dir, table, results = crosscheck
    doc, mode = table[name]
    # mergekit keeps whichever entries tied at a threshold its unstable sort leaves first, which
    # varies with the CPU (bench/results/tie-order.md); `tie_break: mergekit` makes the same sort
    # here, on the same machine, so it must keep the same ones (the magnitude sparsifier's methods)
    sorted_ties = mode == "tie_rate" and doc["merge_method"] in ("ties", "breadcrumbs", "breadcrumbs_ties")
    r, out = ours(work, name, *(["--param", "tie_break=mergekit"] if sorted_ties else []))
    if mode == "refused":
        assert results[name] != "ok", f"mergekit merged {name}"
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
        return
    assert results[name] == "ok", f"mergekit: {results[name]}"
    assert r.exit_code == 0, r.output
    a, b = load_all(out), load_all(str(work / "mk" / name))
    base = load_all(base_dir)
    experts = [load_all(os.path.join(os.path.dirname(base_dir), f"expert-{i}")) for i in (1, 2, 3)]
    assert sorted(a) == sorted(b)
    configs = [json.load(open(os.path.join(d, "config.json"))) for d in (out, str(work / "mk" / name))]
    assert configs[0]["num_hidden_layers"] == configs[1]["num_hidden_layers"]
    mismatched = total = 0
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype, f"{key}: {x.dtype} vs {y.dtype}"
        x, y = x.double(), y.double()
        total += x.numel()
        if mode == "l1":
            if x.numel() >= 4096:
                ratio = task_l1(x, base[key]) / task_l1(y, base[key])
                assert abs(ratio - 1) < 0.1, f"{key}: task-vector L1 ratio {ratio:.3f}"
            continue
        # rounding is relative to the operands (base, experts), not to a result that cancels
        inputs = [
            m[key].double().abs() for m in (base, *experts) if key in m and m[key].shape == x.shape
        ]  # stacked layers: none
        scale = torch.stack([x.abs(), y.abs(), *inputs]).amax(0)
        tol = (4 * 2.0**-8 if mode == "bf16" else 1e-6) * scale
        bad = int(((x - y).abs() > tol).sum())
        if mode in ("exact", "bf16"):
            assert bad == 0, f"{key}: {bad} of {x.numel()} entries differ, worst {float((x - y).abs().max()):.3g}"
        mismatched += bad
    if mode == "tie_rate":
        assert mismatched <= 0.001 * total, f"{mismatched} of {total} entries differ (> 0.1 %)"


SETTING_CASES = [  # (setting, t, the parameter's type)
    (s, t, kind)
    for kind in ("float", "int", "bool", "str")
    for s in (0.3, 2, True, "1e-3", "5", "yes", "off", "maybe", [2, "6"], [5, 8], [0.1, "0.5"], [True, False],
              [0, 1], ["off", 1], ["a", "b", "c"], [{"filter": "mlp", "value": [1, 3]}, {"value": "t"}])
    for t in (0.0, 0.5, 1.0)
]  # fmt: skip


def test_settings_are_read_as_mergekit_reads_them():
    """settings.evaluate against mergekit 0.1.5's own evaluate_setting with pydantic's validators,
    for every scalar type: same value, or both refuse."""
    python = mergekit_python()
    if python is None:
        pytest.skip("mergekit 0.1.5 not installed (tools/run_tests.sh installs it)")
    code = (
        "import json, sys\nfrom pydantic import TypeAdapter\nfrom mergekit.config import evaluate_setting\n"
        "from mergekit.config import ConditionalParameter\nout = []\n"
        "for s, t, kind in json.load(sys.stdin):\n"
        "    if isinstance(s, list) and s and isinstance(s[0], dict): s = [ConditionalParameter(**c) for c in s]\n"
        "    v = TypeAdapter({'float': float, 'int': int, 'bool': bool, 'str': str}[kind]).validate_python\n"
        "    try: out.append(evaluate_setting('model.layers.0.mlp.up_proj.weight', s, t, validate=v))\n"
        "    except Exception: out.append('REFUSED')\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([python, "-c", code], input=json.dumps(SETTING_CASES), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    for (setting, t, kind), expected in zip(SETTING_CASES, theirs):
        try:
            ours = settings.evaluate(setting, "model.layers.0.mlp.up_proj.weight", t, kind, "x")
        except UsageError:
            ours = "REFUSED"
        assert ours == expected and type(ours) is type(expected) or (kind == "float" and float(ours) == expected), (
            setting, t, kind, ours, expected,
        )  # fmt: skip
