"""OrthoMerge with orthogonal–residual decoupling: against the paper's formulas and its traps."""

from __future__ import annotations

import math
import os

import pytest
import torch

from streammerge import Expert, Recipe, merge
from streammerge.math.cayley import cayley, inverse_cayley
from streammerge.methods import TensorTask, build_params
from streammerge.methods.orthomerge import OrthoMergeParams
from streammerge.methods.orthomerge import merge as orthomerge
from tests.conftest import conflicting_models, experts_of, load_all


class Experts(list):
    """In-memory ExpertTensors: a fresh copy per access, as the lazy loader gives."""

    def __getitem__(self, i):
        return super().__getitem__(i).clone()


def run(base, experts, weights=None, **params):
    p = build_params(OrthoMergeParams, params, "test")
    task = TensorTask("layer.weight", base.clone(), Experts(experts), tuple(weights or [1.0] * len(experts)))
    return orthomerge(task, p)


def paper_reference(a: torch.Tensor, ws: list[torch.Tensor], target: str) -> torch.Tensor:
    """Algorithm 2 literally, in float64 and torch layout (W = W₀ Rᵀ), TA on residuals, λ = 1/N."""
    a = a.double()
    ws = [w.double() for w in ws]
    taus = [w - a for w in ws]
    mean = sum(taus) / len(ws)
    qs, rs = [], []
    for tau, w in zip(taus, ws):
        if target == "conflict":
            keep = torch.nn.functional.cosine_similarity(tau, mean, dim=1) < 0
            t = a + tau * keep.unsqueeze(1)
        else:
            t = w
        u, _, vh = torch.linalg.svd(t.T @ a)
        r = u @ vh
        rs.append(r)
        qs.append(inverse_cayley(r) if not torch.equal(t, a) else torch.zeros_like(r))
    total = sum(qs)
    c = sum(float(torch.linalg.matrix_norm(q)) for q in qs) / max(float(torch.linalg.matrix_norm(total)), 1e-300)
    r_star = cayley(c * total / len(qs))
    residual = sum(w - a @ r.T for w, r in zip(ws, rs)) / len(ws)
    return a @ r_star.T + residual


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("shape", [(24, 24), (40, 16)])  # square and tall: Procrustes fully determined
def test_equals_paper_algorithm_where_it_is_determined(target, shape):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[1])
    ws = [a + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[1]) for _ in range(3)]
    got = run(a.float(), [w.float() for w in ws], target=target, base_rtol=1e-12)  # trust every direction, as the paper
    want = paper_reference(a.float(), [w.float() for w in ws], target)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("shape", [(16, 16), (4, 16), (16, 4)])
def test_merging_copies_of_one_expert_returns_it(target, shape):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=g)
    w = a + 0.1 * torch.randn(shape, generator=g)
    got = run(a, [w, w, w, w], target=target)
    torch.testing.assert_close(got, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_result_does_not_depend_on_expert_order(target):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 20, generator=g)
    ws = [a + 0.1 * torch.randn(12, 20, generator=g) for _ in range(4)]
    one = run(a, ws, target=target)
    other = run(a, ws[::-1], target=target)
    torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 32), (32, 32), (32, 8), (32,)])
def test_unchanged_experts_leave_the_base_exactly_untouched(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for target in ("global", "conflict"):
        assert torch.equal(run(a, [a, a, a], target=target), a)


def generator_norms(a: torch.Tensor, w: torch.Tensor, base_rtol: float = 1e-2) -> float:
    from streammerge.math.procrustes import SubspaceBuilder, procrustes

    b = SubspaceBuilder(a, base_rtol)
    b.add(w - a)
    return float(torch.linalg.matrix_norm(procrustes(w, b.build()).dense_q()))


def test_wide_gqa_layers_get_generators_as_small_as_square_ones():
    """k_proj/v_proj/down_proj are wide: the textbook rotation is arbitrary on in − out dims."""
    g = torch.Generator().manual_seed(5)
    hidden, kv = 64, 16
    skew = torch.randn(hidden, hidden, generator=g, dtype=torch.float64)
    true_q = 0.02 * (skew - skew.T) / math.sqrt(hidden)
    r = cayley(true_q)
    orthonormal, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    scales = torch.linspace(1.0, 0.2, hidden, dtype=torch.float64)  # well-conditioned, as most layers
    square = (
        (orthonormal * scales) @ torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))[0].T / 8
    )
    wide = square[:kv] * 1.0
    q_square = generator_norms(square, square @ r.T)
    q_wide = generator_norms(wide, wide @ r.T)
    assert q_square == pytest.approx(float(torch.linalg.matrix_norm(true_q)), rel=1e-6)
    assert 0 < q_wide <= q_square  # only the part of the rotation the wide layer sees
    # the textbook full-space solution on the same wide layer: huge or reflected generators
    u, _, vh = torch.linalg.svd((wide @ r.T).T @ wide)
    naive = u @ vh
    naive_bad = torch.linalg.det(naive) < 0
    if not naive_bad:
        naive_bad = float(torch.linalg.matrix_norm(inverse_cayley(naive))) > 100 * q_square
    assert naive_bad
    assert generator_norms(wide, wide.clone()) < 1e-8


def test_ill_conditioned_base_keeps_generators_sane():
    """A base with condition number 1e6 (real o_proj reach 5e4): noise on the weak directions
    must not become a large rotation, and nothing is NaN."""
    g = torch.Generator().manual_seed(6)
    n = 48
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, n, dtype=torch.float64)
    a = (u * s) @ v.T
    noise = 1e-4 * torch.randn(n, n, generator=g, dtype=torch.float64)
    experts = [a + noise * (i + 1) for i in range(3)]
    got = run(a.float(), [e.float() for e in experts], target="global")
    assert torch.isfinite(got).all()
    norms = [generator_norms(a, e) for e in experts]
    assert max(norms) < 0.05, norms
    # trusting every base direction (base_rtol → 0) lets the update's noise pick rotations
    trusting = [generator_norms(a, e, base_rtol=1e-12) for e in experts]
    assert min(trusting) > 10 * max(norms), (trusting, norms)
    # without the rule (every singular direction trusted) the same inputs rotate wildly
    m = experts[0].T @ a
    uu, _, vvh = torch.linalg.svd(m)
    naive = uu @ vvh
    bad = torch.linalg.det(naive) < 0 or float(torch.linalg.matrix_norm(inverse_cayley(naive))) > 10 * max(norms)
    assert bad
    # a single expert is still reproduced exactly: what the rotation leaves, the residual keeps
    torch.testing.assert_close(run(a, [experts[0]], target="global"), experts[0], atol=1e-9, rtol=0)


def test_ablations_and_scale_behave_as_defined():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    ws = [
        a @ cayley(0.05 * (lambda x: x - x.T)(torch.randn(16, 16, generator=g, dtype=torch.float64))).T
        for _ in range(3)
    ]
    base_kw = dict(target="global", residual={"lambda": 0.0}, precision="float64")
    zero = run(a, ws, scale=0.0, **base_kw)
    torch.testing.assert_close(zero, a)  # scale 0: no rotation, and no residual
    for mode in ("average_q", "average_r", "product_r", "magnitude_corrected"):
        out = run(a, ws, rotation_merge=mode, **base_kw)
        assert torch.isfinite(out).all()
    prod = run(a, ws, rotation_merge="product_r", **base_kw)
    corrected = run(a, ws, rotation_merge="magnitude_corrected", **base_kw)
    averaged = run(a, ws, rotation_merge="average_q", **base_kw)
    # pure rotations: product composes all three; the corrected mean moves further than the plain mean
    assert float((prod - a).norm()) > float((corrected - a).norm()) > float((averaged - a).norm())
    # orthogonal merges keep singular values; average_r does not
    sv = torch.linalg.svdvals(a)
    torch.testing.assert_close(torch.linalg.svdvals(corrected), sv)
    assert not torch.allclose(torch.linalg.svdvals(run(a, ws, rotation_merge="average_r", **base_kw)), sv)


def test_streamed_orthomerge_on_a_model_keeps_norms_residual_only_and_excludes(toy_untied, tmp_path):
    out = str(tmp_path / "om")
    recipe = Recipe(
        "orthomerge",
        os.path.join(toy_untied, "base"),
        tuple(Expert(p) for p in experts_of(toy_untied)),
        out,
        {"target": "global", "exclude": ["embed_tokens", "lm_head"]},
        shard_size="40KB",
    )
    merge(recipe, device="cpu")
    got = load_all(out)
    base = {k: v.float() for k, v in load_all(os.path.join(toy_untied, "base")).items()}
    experts = [{k: v.float() for k, v in load_all(p).items()} for p in experts_of(toy_untied)]
    for name in (
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.embed_tokens.weight",
    ):
        want = base[name] + sum(e[name] - base[name] for e in experts) / 3  # residual only: TA λ = 1/N
        torch.testing.assert_close(got[name].float(), want.to(torch.bfloat16).float(), atol=1e-6, rtol=2**-7)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(got[name], (base[name] + sum(e[name] - base[name] for e in experts) / 3).to(torch.bfloat16))


@pytest.fixture(scope="module")
def toy_lora_f32(tmp_path_factory) -> str:
    from tests.conftest import make_toy

    return make_toy(
        str(tmp_path_factory.mktemp("toy_lora_f32")),
        "--preset",
        "tiny",
        "--experts",
        "3",
        "--kind",
        "lora",
        "--dtype",
        "float32",
        "--shard-size",
        "80KB",
    )


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_lora_experts_rotate_in_their_factors_row_space_and_equal_dense_experts(target, toy_lora_f32, tmp_path):
    """A LoRA expert's τ = B'A' adds at most r directions to the rotation subspace (its float32
    dense copy would add every direction through rounding noise: k = in); the merge equals the
    one of the same experts given as dense float32 models to round-off."""
    import json
    from click.testing import CliRunner
    from streammerge.cli import main

    base = os.path.join(toy_lora_f32, "base")
    adapters = experts_of(toy_lora_f32)
    dense = []
    for i, adapter in enumerate(adapters):  # one adapter merged with `linear`: its dense weights
        dense.append(str(tmp_path / f"dense-{i}"))
        merge(Recipe("linear", base, (Expert(adapter),), dense[-1], {}, dtype="float32"), device="cpu")

    def run_cli(experts, label):
        args = [
            "merge",
            "--quiet",
            "--device",
            "cpu",
            "--base",
            base,
            "--method",
            "orthomerge",
            "--target",
            target,
            "--out",
            str(tmp_path / label),
            "--report",
            str(tmp_path / f"{label}.json"),
            "--dtype",
            "float32",
        ]
        for e in experts:
            args += ["--expert", e]
        r = CliRunner().invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return load_all(str(tmp_path / label)), json.loads((tmp_path / f"{label}.json").read_text())["tensors"]

    from_adapters, report_a = run_cli(adapters, "adapters")
    from_dense, report_d = run_cli(dense, "dense")
    wide = [
        n for n in report_a if "down_proj" in n and "rotation_subspace_dim" in report_a[n]
    ]  # [hidden, intermediate]
    assert wide or target == "conflict"  # these random adapters hardly conflict: no rows to rotate there
    for name in wide:
        out_f, in_f = from_adapters[name].shape
        assert in_f > out_f + 3 * 8
        assert report_a[name]["rotation_subspace_dim"] <= out_f + 3 * 8  # rank(W₀) + Σ r
        assert report_d[name]["rotation_subspace_dim"] > out_f + 3 * 8  # the dense copies' rounding noise
    reference = load_all(base)
    for k, v in from_adapters.items():
        update = float((from_dense[k].double() - reference[k].double()).norm())
        assert float((v.double() - from_dense[k].double()).norm()) <= 1e-5 * max(update, 1e-12), k


LEAN_CASES = [
    {"target": "global"},
    {"target": "conflict"},
    {"target": "global", "residual_method": "ties", "residual": {"density": 0.5}},
    {"target": "conflict", "direction": "uniform", "magnitude": "median"},
    {"target": "global", "rotation_merge": "average_q", "precision": "float32"},
    {"target": "global", "max_angle_deg": 3.0},  # planes reset: the angle rule's eigh path
]


def conflicting_wide(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, inn = shape
    a = torch.randn(shape, generator=g) / math.sqrt(inn)
    common = torch.randn(shape, generator=g) / math.sqrt(inn)
    experts = []
    for _ in range(n):
        signs = torch.randint(0, 2, (out, 1), generator=g) * 2.0 - 1
        experts.append(a + 0.05 * (signs * common + 0.3 * torch.randn(shape, generator=g) / math.sqrt(inn)))
    return a, experts


@pytest.mark.parametrize("params", LEAN_CASES, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("shape", [(24, 90), (40, 90)])  # frame solves (2·out ≤ k) for both targets, and not
def test_lean_wide_path_equals_the_whole_path(params, shape, monkeypatch):
    """#29: wide weights whose subspace may exceed LEAN_WIDE_K (a 70B down_proj) go through
    math/procrustes_wide.py: the same subspace, rotations and Q*, the same merge to float32
    round-off, the same diagnostics; and the result does not depend on the thread count."""
    from streammerge.methods import orthomerge as om

    a, ws = conflicting_wide(shape)
    weights = (1.0, 0.7, 1.2)

    def merged(lean: bool):
        monkeypatch.setattr(om, "LEAN_WIDE_K", 0 if lean else 10**9)
        task = TensorTask("layer.weight", a.clone(), Experts(ws), weights)
        task.diagnostics = {}
        return om.merge(task, build_params(OrthoMergeParams, params, "test")), task.diagnostics

    (whole, d_whole), (lean, d_lean) = merged(False), merged(True)
    update = (whole - a).norm()
    assert (lean - whole).norm() <= 2e-5 * update
    assert d_lean["rotation_subspace_dim"] == d_whole["rotation_subspace_dim"]
    assert d_lean["rotation_share"] == pytest.approx(d_whole["rotation_share"], rel=1e-4)
    assert d_lean["generator_norms"] == pytest.approx(d_whole["generator_norms"], rel=1e-4)
    assert d_lean["planes_reset"] == d_whole["planes_reset"] and (d_lean["planes_reset"] > 0) == (
        "max_angle_deg" in params
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread, _ = merged(True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, lean) or threads == 1


@pytest.mark.parametrize("params", [{"target": "conflict"}, {"target": "conflict", "residual_method": "tsv"}])
@pytest.mark.parametrize("shape", [(24, 90), (40, 90)])
def test_lean_buffer_is_as_wide_as_the_conflicting_rows_need(params, shape, monkeypatch):
    """The conflict target's subspace buffer holds what its conflicting rows can add (the count the
    plan measures), not the full-rank bound, and the merge is bit for bit the one with the bound's."""
    from streammerge.methods import orthomerge as om

    monkeypatch.setattr(om, "LEAN_WIDE_K", 0)
    a, ws = conflicting_wide(shape)
    widths = []

    class Spy(om.SubspaceBuffer):
        def __init__(self, a, base_rtol, dtype, capacity):
            widths.append(capacity)
            super().__init__(a, base_rtol, dtype, capacity)

    monkeypatch.setattr(om, "SubspaceBuffer", Spy)

    def merged():
        return om.merge(TensorTask("layer.weight", a.clone(), Experts(ws), (1.0, 0.7, 1.2)),
                        build_params(OrthoMergeParams, params, "test"))  # fmt: skip

    narrow = merged()
    taus = [w - a for w in ws]
    counts = [int(r.sum()) for r in om.conflicts_among(taus)]
    expected = om.measured_subspace(shape, {"conflicts": counts, "ranks": [None] * 3})
    assert widths == [expected] and expected < om.subspace_bound(shape, 3), (widths, counts)
    monkeypatch.setattr(om._Targets, "capacity", lambda self, n: om.subspace_bound(shape, n))
    assert torch.equal(merged(), narrow) and widths[-1] == om.subspace_bound(shape, 3)


@pytest.mark.parametrize("params", [{"target": "global"}, {"target": "conflict", "residual_method": "tsv"}])
def test_lean_wide_path_does_not_depend_on_its_chunk_size(params, monkeypatch):
    """#29.4: the lean path's column and row chunks (of P F, the moved bases, the generator sum)
    change how much is held, not the bytes of the result."""
    from streammerge.math import procrustes_wide
    from streammerge.methods import orthomerge as om

    monkeypatch.setattr(om, "LEAN_WIDE_K", 0)
    a, ws = conflicting_wide((40, 90))

    def merged(chunk: int):
        monkeypatch.setattr(procrustes_wide, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(om, "CHUNK_ELEMENTS", chunk)
        task = TensorTask("layer.weight", a.clone(), Experts(ws), (1.0, 0.7, 1.2))
        return om.merge(task, build_params(OrthoMergeParams, params, "test"))

    whole = merged(1 << 22)  # one chunk at this size
    for chunk in (1 << 9, 1000, 1 << 11):  # 5 to 22 columns of P F, 5 to 22 rows of the sum per chunk
        assert torch.equal(merged(chunk), whole), chunk


def test_lean_wide_path_keeps_the_paths_exact_cases(monkeypatch):
    """Copies of one expert give it back; experts equal to the base leave it bit for bit."""
    from streammerge.methods import orthomerge as om

    monkeypatch.setattr(om, "LEAN_WIDE_K", 0)
    a, ws = conflicting_wide((16, 64), n=1, seed=5)
    for target in ("global", "conflict"):
        torch.testing.assert_close(run(a, [ws[0]] * 4, target=target), ws[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(run(a, [a, a, a], target=target), a)


def test_only_weights_beyond_8b_take_the_lean_wide_path():
    from streammerge.methods.orthomerge import lean_wide

    p = OrthoMergeParams()
    assert not lean_wide((4096, 14336), 5, p)  # Llama-3.1-8B down_proj: the whole path, its bytes kept
    assert lean_wide((8192, 28672), 5, p)  # Llama-3-70B down_proj
    assert not lean_wide((1024, 8192), 5, p)  # 70B k_proj/v_proj: k ≤ 6144
    assert not lean_wide((8192, 28672), 5, OrthoMergeParams(rotation_merge="product_r"))


@pytest.mark.parametrize("shape", [(256, 128), (96, 384), (8200, 512)], ids=["square", "frame", "tall"])
@pytest.mark.parametrize("target", ["global", "conflict"])
def test_two_solves_side_by_side_give_the_bytes_of_one_after_the_other(target, shape, tmp_path, monkeypatch):
    """Where the plan counts it (Need.side_by_side) and two threads run, two experts' Procrustes
    solves run at once, each on one thread: the same bytes as one thread solving one at a time
    (three experts: a pair, then one alone; k×k solves, w×w frame solves of a wide weight, and
    a tall weight's in×in solves from its row blocks' cross products)."""
    from streammerge.engine import Merge, RunOptions
    from streammerge.methods import orthomerge as om

    models = conflicting_models(str(tmp_path / "models"), shape, "w.weight")
    taken: list[bool] = []
    each = om.side_by_side.each
    monkeypatch.setattr(om.side_by_side, "each", lambda *a: taken.append(a[-1]) or each(*a))
    threads = torch.get_num_threads()
    files = {}
    try:
        for t in (1, 2):
            out = str(tmp_path / f"threads{t}")
            recipe = Recipe("orthomerge", os.path.join(models, "base"), tuple(Expert(p) for p in experts_of(models)),
                            out, {"target": target})  # fmt: skip
            job = Merge(recipe, RunOptions(device="cpu", threads=t, quiet=True))
            try:
                assert [p.name for p in job.plan.tensors if p.side_by_side] == (["w.weight"] if t == 2 else [])
                job.run()
            finally:
                job.close()
            assert taken == [t == 2]
            taken.clear()
            files[t] = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if "safetensors" in f}
    finally:
        torch.set_num_threads(threads)
    assert files[1] == files[2] and files[1]


def test_an_interrupt_during_two_solves_does_not_wait_for_the_second():
    """Ctrl-C while the main thread solves one expert leaves at once: the worker's solve (minutes
    at 8B shapes) is not waited for; the command then ends its process (cli.entry)."""
    import threading
    import time

    from streammerge.math import side_by_side

    release = threading.Event()

    def solve(i: int) -> int:
        if i == 0:
            raise KeyboardInterrupt
        release.wait(10)  # the second solve, still running when the first is interrupted
        return i

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(side_by_side.each(2, lambda i: i, solve, True))
    waited = time.monotonic() - start
    release.set()
    assert waited < 5, f"waited {waited:.1f} s for the second solve"
    assert [r for _, r in side_by_side.each(3, lambda i: i + 1, lambda x: x * 2, True)] == [2, 4, 6]
