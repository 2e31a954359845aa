"""Row blocks change no result: every row-local method gives byte-identical shards whether a
tensor is merged whole or streamed in small row blocks (TIES both with its N task vectors
kept whole and streamed with histogram thresholds), for full-model and LoRA experts; the radix
select equals a sort; the block-streamed sign election keeps the tensor's majority sign."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from streammerge import Expert, Recipe, merge
from streammerge import methods
from streammerge.io.atomic import ShardWriter
from streammerge.methods import ties
from tests.conftest import experts_of, make_toy

CASES = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "merge": "sum"}),
    ("ties", {"density": 0.2, "scope": "model"}),
    ("dare", {"drop_rate": 0.4}),
    ("dare", {"drop_rate": 0.3, "combine": "ties"}),
    ("orthomerge", {"target": "conflict"}),  # its 1-D tensors and residual go through the same code
    ("gta", {"sparsify": "random", "consensus": "sum", "rescale": True, "density": 0.4}),
    ("gta", {"sparsify": "della_magprune", "normalize": True, "rescale": True, "density": 0.5}),
    ("gta", {"sparsify": "none", "consensus": "count", "normalize": True}),
]
# magnitude sparsifiers break ties at a threshold by mergekit's sort when a tensor is merged whole
# and by row-major order when streamed (gta.py): the same with blocks, tested apart when streamed
WHOLE_ONLY = [
    ("gta", {"sparsify": "magnitude", "consensus": "sum", "normalize": True, "density": 0.3}),
    ("gta", {"sparsify": "magnitude_outliers", "rescale": True, "density": 0.5, "gamma": 0.05}),
]


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory) -> str:
    return make_toy(
        str(tmp_path_factory.mktemp("toy_lora_blocks")),
        "--preset",
        "tiny",
        "--experts",
        "3",
        "--kind",
        "lora",
        "--shard-size",
        "60KB",
    )


def shard_digests(folder: str) -> dict[str, str]:
    return {
        f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(folder))
        if f.endswith(".safetensors")
    }


def run(folder: str, out: str, method: str, params: dict, weights=(1.0, 0.5, 1.0)) -> dict[str, str]:
    experts = tuple(Expert(p, w) for p, w in zip(experts_of(folder), weights))
    merge(
        Recipe(method, os.path.join(folder, "base"), experts, out, dict(params), shard_size="60KB", seed=3),
        device="cpu",
    )
    return shard_digests(out)


@pytest.mark.parametrize("fixture", ["toy_untied", "toy_lora"])
@pytest.mark.parametrize(
    "method,params",
    CASES + WHOLE_ONLY,
    ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p in CASES + WHOLE_ONLY],
)
def test_row_blocks_give_identical_shards(fixture, method, params, request, tmp_path, monkeypatch):
    folder = request.getfixturevalue(fixture)
    whole = run(folder, str(tmp_path / "whole"), method, params)
    monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", 1000)  # tiny tensors: up to 17 blocks each
    blocked = run(folder, str(tmp_path / "blocked"), method, params)
    if (method, params) in WHOLE_ONLY:
        assert whole == blocked
        return
    monkeypatch.setattr(ties, "CACHE_BYTES", 0)  # TIES: histogram passes over the blocks too
    streamed = run(folder, str(tmp_path / "streamed"), method, params)
    assert whole == blocked == streamed


def write_model(folder: str, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(folder)
    layout = [(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    with ShardWriter(os.path.join(folder, "model.safetensors"), layout) as writer:
        for n, t in tensors.items():
            writer.write(n, t)
        writer.commit()


def test_streamed_sign_election_keeps_the_majority_sign(tmp_path, monkeypatch):
    """Most entries elect −1, and some entries cancel exactly (+1 and −1): those take the
    tensor's majority sign (−1), whole or in blocks."""
    shape = (64, 50)
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(shape)
    e1 = -torch.rand(shape, generator=g) - 0.5
    e2 = -torch.rand(shape, generator=g) - 0.5
    cancel = torch.rand(shape, generator=g) < 0.1
    e1[cancel], e2[cancel] = 1.0, -1.0
    for name, w in (("base", base), ("expert-1", e1), ("expert-2", e2)):
        write_model(str(tmp_path / name), {"w.weight": w})
    out = {}
    for label, block in (("whole", 10**9), ("blocked", 300)):
        monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", block)
        folder = str(tmp_path / label)
        recipe = Recipe(
            "ties",
            str(tmp_path / "base"),
            (Expert(str(tmp_path / "expert-1")), Expert(str(tmp_path / "expert-2"))),
            folder,
            {"density": 1.0},
        )
        merge(recipe, device="cpu")
        from safetensors.torch import load_file

        out[label] = load_file(
            os.path.join(
                folder, json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]["w.weight"]
            )
        )["w.weight"]
    assert torch.equal(out["whole"], out["blocked"])
    assert torch.equal(out["whole"][cancel], torch.full((int(cancel.sum()),), -1.0))  # the −1 expert's value


@pytest.mark.parametrize("seed", range(5))
def test_radix_select_equals_a_sort(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, generator=g) * torch.rand(5000, generator=g) ** 4
    x[::7] = 0.0
    x[::11] = x[3]  # ties
    for k in (1, 17, 2500, 4999, 5000):
        expected = float(x.abs().sort(descending=True).values[k - 1])
        assert ties.kth_largest_magnitude(x, k) == expected
        select = ties.RadixSelect(k)  # streamed in uneven chunks
        chunks = [x[:1234], x[1234:1235], x[1235:]]
        for stage in ("add_high", "add_low"):
            for c in chunks:
                getattr(select, stage)(ties.magnitude_bits(c))
        assert select.value() == expected


@pytest.fixture(scope="module")
def toy_conflicting(tmp_path_factory) -> str:
    """Experts sharing a per-row direction with random signs: each conflicts on ~1/4 of the rows."""
    return make_toy(
        str(tmp_path_factory.mktemp("toy_conflicting_blocks")),
        "--preset",
        "tiny",
        "--experts",
        "3",
        "--shared",
        "0.7",
        "--shard-size",
        "60KB",
    )


def load_outputs(folder: str) -> dict[str, torch.Tensor]:
    from tests.conftest import load_all

    return load_all(folder)


@pytest.mark.parametrize(
    "target,residual",
    [("global", "task_arithmetic"), ("conflict", "task_arithmetic"), ("conflict", "ties"), ("global", "dare_linear")],
)
def test_orthomerge_of_tall_weights_in_row_blocks_equals_the_whole_merge(
    target, residual, toy_conflicting, tmp_path, monkeypatch
):
    """Tall weights (embeddings, lm_head, gate/up) in row blocks: Gram-based base directions and
    block-summed cross products give the whole-tensor result to round-off (float32 output)."""
    params = {"target": target, "residual_method": residual}
    experts = tuple(Expert(p) for p in experts_of(toy_conflicting))

    def run_with(label: str) -> dict[str, torch.Tensor]:
        out = str(tmp_path / label)
        merge(
            Recipe(
                "orthomerge", os.path.join(toy_conflicting, "base"), experts, out, dict(params), dtype="float32", seed=1
            ),
            device="cpu",
        )
        return load_outputs(out)

    whole = run_with("whole")
    monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", 1000)
    blocked = run_with("blocked")
    base = load_outputs(os.path.join(toy_conflicting, "base"))
    moved = 0
    for name, w in whole.items():
        update = (w - base[name].float()).norm()
        diff = (blocked[name] - w).norm()
        assert diff <= 1e-4 * max(float(update), 1e-12) + 1e-7, (name, float(diff), float(update))
        if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
            moved += int(float(update) > 0)
    assert moved == 2  # the tall weights were really merged (and rotated) in blocks


@pytest.mark.parametrize(
    "method,params",
    [
        ("model_stock", {}),
        ("model_stock", {"filter_wise": True}),
        ("karcher", {}),
        ("karcher", {"max_iter": 2}),
        ("sce", {}),
        ("sce", {"select_topk": 0.4}),
        ("sce", {"select_topk": 0.0}),
    ],
)
def test_whole_tensor_mergekit_methods_stream_in_row_blocks(method, params, toy_conflicting, tmp_path, monkeypatch):
    """model_stock, sce and karcher merge a tensor too large for its N inputs in row blocks (their
    sums over the tensor in float64; karcher iterates on coefficients of a Gram matrix): equal to
    the whole-tensor merge to float32 round-off; with
    a top-k variance mask, to the same formula with ties at the threshold kept in row-major order."""
    from streammerge.methods import karcher, model_stock, sce

    experts = tuple(Expert(p) for p in experts_of(toy_conflicting))

    def run_with(label: str) -> dict[str, torch.Tensor]:
        out = str(tmp_path / label)
        merge(
            Recipe(method, os.path.join(toy_conflicting, "base"), experts, out, dict(params), dtype="float32"),
            device="cpu",
        )
        return load_outputs(out)

    whole = run_with("whole")
    monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(model_stock, "WHOLE_BYTES", 0)
    monkeypatch.setattr(sce, "WHOLE_BYTES", 0)
    monkeypatch.setattr(karcher, "WHOLE_BYTES", 0)
    streamed = run_with("streamed")
    assert whole.keys() == streamed.keys()
    topk = params.get("select_topk", 1.0)
    base = load_outputs(os.path.join(toy_conflicting, "base"))
    inputs = [load_outputs(p) for p in experts_of(toy_conflicting)]
    for name in whole:
        expected = whole[name]
        if 0 < topk < 1 and whole[name].numel() > 1000:  # bf16 inputs tie at the threshold: row-major ties
            expected = sce_with_row_major_ties(base[name].float(), [e[name].float() for e in inputs], topk)
        scale = float(expected.abs().max()) or 1.0
        tolerance = 1e-5 if method == "karcher" else 1e-6  # its whole-tensor norms and dots are float32 sums
        assert torch.allclose(expected, streamed[name], rtol=0, atol=tolerance * scale), name


def sce_with_row_major_ties(w0: torch.Tensor, ws: list[torch.Tensor], topk: float) -> torch.Tensor:
    """sce's formula on whole tensors, keeping the earliest entries among variances tied at the
    k-th largest (a stable sort), as the streamed mask does."""
    tvs = torch.stack([w - w0 for w in ws])
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    k = int(int(torch.count_nonzero(var)) * topk)
    mask = torch.zeros_like(var)
    mask[torch.sort(var.abs(), descending=True, stable=True).indices[:k]] = 1
    tvs = tvs * mask.view(w0.shape)
    c = tvs.square().reshape(len(ws), -1).mean(dim=1)
    c = c / c.sum()
    agree = (tvs.sign() == torch.where(tvs.sum(0) >= 0, 1.0, -1.0)).float() * c.view(-1, *[1] * w0.dim())
    return w0 + (tvs * agree).sum(0) / agree.sum(0).clamp(min=1e-6)


def test_streamed_plans_of_mergekit_whole_tensor_methods_are_blocks():
    """At an 8B embedding the streamed plans need N blocks, not N copies of a 2 GB tensor."""
    from streammerge.methods import karcher, model_stock, sce

    shape, n = (128256, 4096), 5
    for module, params in (
        (model_stock, model_stock.ModelStockParams()),
        (sce, sce.SceParams(select_topk=0.5)),
        (karcher, karcher.KarcherParams()),
    ):
        need = module.memory("model.embed_tokens.weight", shape, n, params, 4)
        assert need.work < 64 * methods.BLOCK_ELEMENTS * 4
        small = module.memory("w", (64, 64), n, params, 4)
        assert small.work >= 4 * 64 * 64 * 4  # whole: several copies of the tensor


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 0.003}), ("ramplus_tl", {"epsilon": 0.003, "r": 0.5})])
def test_ram_methods_in_row_blocks_give_identical_shards(method, params, toy_untied, tmp_path, monkeypatch):
    """RAM's per-entry masks are row-local; RAM+'s per-expert counts are integers summed over the
    blocks: both exact at any block size (#25.8)."""
    whole = run(toy_untied, str(tmp_path / "whole"), method, params, weights=(None, None, None))
    monkeypatch.setattr(methods.base, "BLOCK_ELEMENTS", 1000)
    assert run(toy_untied, str(tmp_path / "blocked"), method, params, weights=(None, None, None)) == whole
