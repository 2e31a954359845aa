"""The spectral methods (tsv, iso_c, iso_cts, ortho_svd): each against an in-memory float64
reference of its published formula on toy models, the properties that define it (Hypothesis),
LoRA experts (SVDs from the factors) against the same adapters merged into dense models by
PEFT, and use as OrthoMerge's residual."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import Expert, Recipe, merge
from streammerge.methods import TensorTask, iso_c, ortho_svd, tsv
from tests.conftest import experts_of, load_all, make_toy


class Fresh:
    """In-memory experts that hand out copies, as the engine's lazy experts do."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i].clone()


def task_of(base: torch.Tensor, experts: list[torch.Tensor]) -> TensorTask:
    return TensorTask("model.layers.0.mlp.up_proj.weight", base.clone(), Fresh(experts), tuple(1.0 for _ in experts))


# -- float64 references, written from the papers' formulas (authors' conventions: all min(m, n)) --
def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def ref_tsv(taus, alpha=1.0):
    keep = min(taus[0].shape) // len(taus)
    us, ss, vs = zip(*(torch.linalg.svd(t, full_matrices=False) for t in taus))
    u = polar(torch.cat([x[:, :keep] for x in us], 1))
    vh = polar(torch.cat([x[:keep] for x in vs], 0))
    return alpha * (u * torch.cat([x[:keep] for x in ss])) @ vh


def ref_iso_c(taus, alpha=1.0):
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return alpha * (u * s.mean()) @ vh


def ref_iso_cts(taus, alpha=1.0, frac=0.8):
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    r = min(taus[0].shape)
    c = int(r * frac)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c]]
    per = (r - c) // len(taus)
    for t in taus:
        ui, si, vi = torch.linalg.svd(t - u[:, :c] @ (u[:, :c].T @ t), full_matrices=False)
        us.append(ui[:, :per]), ss.append(si[:per]), vs.append(vi[:per])
    return alpha * (polar(torch.cat(us, 1)) * torch.cat(ss).mean()) @ polar(torch.cat(vs, 0))


def ref_ortho_svd(taus, threshold=0.5, k=16):
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    removed = [set() for _ in taus]
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            for m in range(min(k, svds[i][1].numel())):
                for n in range(min(k, svds[j][1].numel())):
                    if abs(float(svds[i][0][:, m] @ svds[j][0][:, n])) > threshold:
                        if svds[i][1][m] < svds[j][1][n]:
                            removed[i].add(m)
                        else:
                            removed[j].add(n)
    clean = []
    for t, (u, s, vh), rem in zip(taus, svds, removed):
        clean.append(t - sum((s[m] * torch.outer(u[:, m], vh[m]) for m in rem), torch.zeros_like(t)))
    return ref_iso_c(clean)


REFS = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts, "ortho_svd": ref_ortho_svd}


@pytest.mark.parametrize("method", sorted(REFS))
def test_matches_float64_reference_on_a_toy_model(method, toy_untied, tmp_path):
    out = str(tmp_path / "o")
    params = {"threshold": 0.05} if method == "ortho_svd" else {}  # toy experts: make some pairs interfere
    merge(
        Recipe(
            method,
            os.path.join(toy_untied, "base"),
            tuple(Expert(p) for p in experts_of(toy_untied)),
            out,
            params,
            dtype="float32",
        ),
        device="cpu",
    )
    got = load_all(out)
    base = {k: v.double() for k, v in load_all(os.path.join(toy_untied, "base")).items()}
    experts = [{k: v.double() for k, v in load_all(p).items()} for p in experts_of(toy_untied)]
    ref = REFS[method] if method != "ortho_svd" else (lambda taus: ref_ortho_svd(taus, threshold=0.05))
    for name, w0 in base.items():
        taus = [e[name] - w0 for e in experts]
        want = w0 + (ref(taus) if w0.dim() == 2 else sum(taus) / len(taus))
        update = (want - w0).norm()
        err = (got[name].double() - want).norm()
        assert err <= 1e-5 * update + 1e-6 * w0.norm(), f"{name}: relative error {float(err / update):.2e}"


matrices = st.tuples(st.integers(4, 24), st.integers(4, 24), st.integers(2, 4), st.integers(0, 10_000))


def random_taus(m, n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, dtype=torch.float64, generator=g), [
        torch.randn(m, n, dtype=torch.float64, generator=g) for _ in range(count)
    ]


@settings(max_examples=25, deadline=None)
@given(matrices)
def test_tsv_combined_factors_are_orthonormal(shape):
    m, n, count, seed = shape
    base, taus = random_taus(m, n, count, seed)
    update = tsv.merge(task_of(base, [base + t for t in taus]), tsv.TsvParams()) - base
    keep = min(m, n) // count
    # the update is U⊥ diag(σ) V⊥ᵀ with orthonormal U⊥, V⊥: its singular values are the kept σ's
    kept = torch.sort(torch.cat([torch.linalg.svdvals(t)[:keep] for t in taus]), descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(update)[: kept.numel()], kept, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(matrices)
def test_iso_c_spectrum_is_flat(shape):
    m, n, count, seed = shape
    base, taus = random_taus(m, n, count, seed)
    update = iso_c.merge(task_of(base, [base + t for t in taus]), iso_c.IsoCParams()) - base
    s = torch.linalg.svdvals(update)
    torch.testing.assert_close(
        s, torch.full_like(s, float(torch.linalg.svdvals(sum(taus)).mean())), rtol=1e-9, atol=1e-9
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(6, 20), st.integers(2, 4), st.integers(0, 10_000), st.floats(0.3, 0.9))
def test_ortho_svd_removes_exactly_the_weaker_of_each_interfering_pair(m, count, seed, threshold):
    """Experts built on one orthonormal basis: component (i, s) points along basis vector
    b(i, s); two components interfere iff they share a basis vector (|cos| = 1 > τ), else 0.
    Right vectors are distinct for every (expert, basis vector), so what is kept sums exactly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))[0]
    right = torch.linalg.qr(torch.randn(m * count, m * count, dtype=torch.float64, generator=g))[0]
    slots = torch.randint(0, m, (count, 3), generator=g)
    sigmas = torch.rand(count, 3, dtype=torch.float64, generator=g) + 0.5
    taus, comps = [], []
    for i in range(count):
        chosen = list(dict.fromkeys(slots[i].tolist()))  # distinct directions within an expert
        cs = [
            (b, float(sigmas[i, j]) * (1 + j), torch.outer(basis[:, b], right[:, i * m + b]))
            for j, b in enumerate(chosen)
        ]
        comps.append(cs)
        taus.append(sum(s * c for _, s, c in cs))
    expected = [t.clone() for t in taus]
    removed = [set() for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            for bi, si, _ in comps[i]:
                for bj, sj, _ in comps[j]:
                    if bi == bj:
                        (removed[i].add(bi) if si < sj else removed[j].add(bj))
    for i in range(count):
        for b, s, c in comps[i]:
            if b in removed[i]:
                expected[i] = expected[i] - s * c
    base = torch.zeros(m, m * count, dtype=torch.float64)
    got = ortho_svd.merge(task_of(base, taus), ortho_svd.OrthoSvdParams(threshold=threshold, top_k=m))
    u, s, vh = torch.linalg.svd(sum(expected), full_matrices=False)
    r = int((s > 1e-9 * s[0]).sum())  # the sum is low-rank here: iso_c over its rank (math/spectral.py)
    torch.testing.assert_close(got, (u[:, :r] * s[:r].mean()) @ vh[:r], rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def peft_loras(tmp_path_factory):
    """Three PEFT LoRA adapters on a float32 toy base, and each merged into a dense model by PEFT."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("spectral_lora")
    toy = make_toy(
        str(work / "toy"), "--preset", "tiny", "--experts", "1", "--dtype", "float32", "--shard-size", "80KB"
    )
    base = os.path.join(toy, "base")
    adapters, dense = [], []
    for i in range(3):
        torch.manual_seed(100 + i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        pm = peft.get_peft_model(model, cfg)
        pm.save_pretrained(str(work / f"a{i}"))
        pm.merge_and_unload().save_pretrained(str(work / f"d{i}"))
        adapters.append(str(work / f"a{i}"))
        dense.append(str(work / f"d{i}"))
    return base, adapters, dense


@pytest.mark.parametrize("method", sorted(REFS) + ["do_merging"])
def test_lora_experts_equal_peft_merged_dense_experts(method, peft_loras, tmp_path):
    """do_merging orthogonalises LoRA factors, not dense matrices (the paper's design): its
    decoupling and merge are compared here, without the descent (steps 0)."""
    base, adapters, dense = peft_loras
    params = {"threshold": 0.2} if method == "ortho_svd" else {"steps": 0} if method == "do_merging" else {}
    merge(
        Recipe(method, base, tuple(Expert(a) for a in adapters), str(tmp_path / "lora"), params, dtype="float32"),
        device="cpu",
    )
    merge(
        Recipe(method, base, tuple(Expert(d) for d in dense), str(tmp_path / "dense"), params, dtype="float32"),
        device="cpu",
    )
    a, b = load_all(str(tmp_path / "lora")), load_all(str(tmp_path / "dense"))
    w0 = load_all(base)
    changed = 0
    for name in a:
        update = (b[name] - w0[name]).norm()
        changed += int(update > 0)
        assert (a[name] - b[name]).norm() <= 1e-4 * update + 1e-6, name
    assert changed


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_serves_as_orthomerge_residual(method, toy_untied, tmp_path):
    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    base = os.path.join(toy_untied, "base")
    merge(
        Recipe("orthomerge", base, experts, str(tmp_path / "o"), {"residual_method": method, "target": "global"}),
        device="cpu",
    )
    merge(Recipe("orthomerge", base, experts, str(tmp_path / "ta"), {"target": "global"}), device="cpu")
    a, b = load_all(str(tmp_path / "o")), load_all(str(tmp_path / "ta"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv", "ortho_svd", "do_merging"])
def test_row_block_streaming_equals_the_whole_tensor_merge(method, toy_untied, tmp_path, monkeypatch):
    """Tall tensors through Gram matrices (iso_c, iso_cts, tsv, ortho_svd), every tensor in two
    passes (do_merging). ortho_svd with a threshold at which toy experts interfere."""
    from streammerge import methods

    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    base = os.path.join(toy_untied, "base")
    params = {"threshold": 0.05} if method == "ortho_svd" else {}
    merge(Recipe(method, base, experts, str(tmp_path / "whole"), params, dtype="float32"), device="cpu")
    monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", 1000)
    merge(Recipe(method, base, experts, str(tmp_path / "blocks"), params, dtype="float32"), device="cpu")
    a, b = load_all(str(tmp_path / "whole")), load_all(str(tmp_path / "blocks"))
    w0 = load_all(base)
    for name in a:
        update = (a[name] - w0[name].float()).norm()
        assert (a[name] - b[name]).norm() <= 1e-5 * update + 1e-7, name
    if method == "ortho_svd":  # the streamed path did remove components: without removal it differs
        merge(Recipe(method, base, experts, str(tmp_path / "none"), {"threshold": 1.0}, dtype="float32"), device="cpu")
        kept_all = load_all(str(tmp_path / "none"))
        assert not torch.allclose(kept_all["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "ortho_svd", "do_merging"])
def test_oft_experts_merge(method, tmp_path):
    toy = make_toy(
        str(tmp_path / "oft"), "--preset", "tiny", "--experts", "2", "--kind", "oft", "--oft-block-size", "8"
    )
    out = str(tmp_path / "o")
    merge(
        Recipe(
            method, os.path.join(toy, "base"), tuple(Expert(p) for p in experts_of(toy, 2)), out, {}, dtype="float32"
        ),
        device="cpu",
    )
    got, base = load_all(out), load_all(os.path.join(toy, "base"))
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"].float()
    )


def test_iso_cts_wide_tensors_through_gram_matrices(toy_untied, tmp_path, monkeypatch):
    """#29: a wide tensor above WIDE_GRAM_ELEMENTS (a 70B down_proj) is merged through m×m Gram
    matrices one expert at a time: equal to the published formula (float64), and through the
    engine equal to the whole-tensor merge to float32 round-off."""
    from streammerge.methods import iso_cts, spectral_common

    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 90, dtype=torch.float64, generator=g)
    taus = [torch.randn(24, 90, dtype=torch.float64, generator=g) * (i + 1) for i in range(3)]
    task = task_of(base, [base + t for t in taus])
    got = iso_cts.merge_wide(task, iso_cts.IsoCtsParams(alpha=1.5), 0.0)
    want = base + ref_iso_cts(taus, alpha=1.5)
    assert (got - want).norm() <= 1e-10 * (want - base).norm()
    # its column chunks are a constant of the code (no budget changes them); other chunk sizes sum
    # the Gram matrices in another order: the same result to round-off
    from streammerge.methods import base as method_base

    monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 24 * 7)  # 7-column chunks
    assert len(spectral_common.column_chunks((24, 90))) == 13
    chunked = iso_cts.merge_wide(task_of(base, [base + t for t in taus]), iso_cts.IsoCtsParams(alpha=1.5), 0.0)
    assert (chunked - got).norm() <= 1e-12 * (want - base).norm()
    monkeypatch.undo()

    experts = tuple(Expert(p) for p in experts_of(toy_untied))
    root = os.path.join(toy_untied, "base")
    merge(Recipe("iso_cts", root, experts, str(tmp_path / "whole"), dtype="float32"), device="cpu")
    monkeypatch.setattr(spectral_common, "WIDE_GRAM_ELEMENTS", 0)
    taken = []
    real = spectral_common.gram_wide
    monkeypatch.setattr(spectral_common, "gram_wide", lambda t: real(t) and not taken.append(t.name))
    merge(Recipe("iso_cts", root, experts, str(tmp_path / "wide"), dtype="float32"), device="cpu")
    assert any("down_proj" in name for name in taken), taken
    a, b, w0 = load_all(str(tmp_path / "whole")), load_all(str(tmp_path / "wide")), load_all(root)
    for name in taken:
        update = (a[name] - w0[name].float()).norm()
        assert (a[name] - b[name]).norm() <= 1e-5 * update + 1e-7, name
