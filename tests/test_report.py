"""--report and `streammerge report`: every merged tensor recorded, the generic figures equal a
direct computation, OrthoMerge and the spectral methods add theirs, the summary and plots run."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from streammerge.cli import main
from tests.conftest import experts_of, load_all


def run_with_report(folder: str, tmp_path, method: str, *extra: str) -> dict:
    args = [
        "merge",
        "--quiet",
        "--device",
        "cpu",
        "--base",
        os.path.join(folder, "base"),
        "--method",
        method,
        "--out",
        str(tmp_path / "o"),
        "--report",
        str(tmp_path / "r.json"),
        *extra,
    ]
    for e in experts_of(folder):
        args += ["--expert", e]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert not os.path.exists(tmp_path / "r.json.partial")
    return json.loads((tmp_path / "r.json").read_text())


def test_generic_figures_equal_a_direct_computation(toy_untied, tmp_path):
    doc = run_with_report(toy_untied, tmp_path, "ties", "--density", "0.3")
    base = {k: v.double() for k, v in load_all(os.path.join(toy_untied, "base")).items()}
    experts = [{k: v.double() for k, v in load_all(p).items()} for p in experts_of(toy_untied)]
    merged = {k: v.double() for k, v in load_all(str(tmp_path / "o")).items()}
    assert sorted(doc["tensors"]) == sorted(base)
    name = "model.layers.1.mlp.up_proj.weight"
    rec = doc["tensors"][name]
    taus = [e[name] - base[name] for e in experts]
    assert rec["task_vector_norms"] == pytest.approx([float(t.norm()) for t in taus], rel=1e-6)
    cos01 = float((taus[0] * taus[1]).sum() / (taus[0].norm() * taus[1].norm()))
    assert rec["cosines"][0][1] == pytest.approx(cos01, abs=1e-6)
    # the merged update measured before rounding to the output dtype: within a bf16 step of the stored one
    assert rec["update_norm"] == pytest.approx(float((merged[name] - base[name]).norm()), rel=1e-2)


def test_methods_add_their_diagnostics_and_the_summary_reads_them(toy_untied, tmp_path):
    doc = run_with_report(toy_untied, tmp_path, "orthomerge", "--target", "global")
    rec = doc["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert len(rec["generator_norms"]) == 3 and 0 < rec["rotation_share"] < 1 and 0 < rec["generator_agreement"] <= 1
    r = CliRunner().invoke(main, ["report", str(tmp_path / "r.json")])
    assert r.exit_code == 0 and "self_attn.q_proj.weight" in r.output and "rotation share" in r.output
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")])
    assert r.exit_code == 0 and os.path.getsize(tmp_path / "plots" / "rotation_share.png") > 1000


def test_spectral_methods_record_ranks(toy_untied, tmp_path):
    doc = run_with_report(toy_untied, tmp_path, "tsv")
    assert doc["tensors"]["model.layers.0.mlp.down_proj.weight"]["kept_rank"] == 3 * (64 // 3)


def test_report_of_a_non_report_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    r = CliRunner().invoke(main, ["report", str(tmp_path / "x.json")])
    assert r.exit_code == 3 and "not a streammerge report" in r.output


def test_summary_shows_the_columns_that_apply_and_plots_explain_themselves(toy_untied, tmp_path):
    """#24.15: TIES has no rotation columns; OrthoMerge-C plots its conflicting rows and a spectral
    method its kept ranks; every plot has integer layer ticks, its legend beside the axes and a
    sentence saying how to read it."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from streammerge import report

    for sub in ("ties", "om", "tsv"):
        (tmp_path / sub).mkdir()
    doc = run_with_report(toy_untied, tmp_path / "ties", "ties")
    table = report.summary(doc)
    assert "mean cos" in table and "rotation share" not in table and "kept rank" not in table
    doc = run_with_report(toy_untied, tmp_path / "om", "orthomerge", "--target", "conflict")
    assert "rotation share" in report.summary(doc) and "kept rank" not in report.summary(doc)
    figures = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        done = original(self, *args, **kwargs)  # drawn: the extents are known
        ax, renderer = self.axes[0], self.canvas.get_renderer()
        legend = ax.get_legend().get_window_extent(renderer)
        figures.append(
            (list(ax.get_xticks()), legend.x0, ax.get_window_extent(renderer).x1, [t.get_text() for t in self.texts])
        )
        return done

    Figure.savefig = keep
    try:
        written = report.plot(doc, str(tmp_path / "plots"))
        written += report.plot(run_with_report(toy_untied, tmp_path / "tsv", "tsv"), str(tmp_path / "plots2"))
    finally:
        Figure.savefig = original
    names = {os.path.basename(p) for p in written}
    assert {"rotation_share.png", "conflict_rows.png", "kept_rank.png"} <= names, names
    assert len(figures) == len(written)
    for ticks, legend_x0, axes_x1, texts in figures:
        assert all(float(t).is_integer() for t in ticks)
        assert legend_x0 >= axes_x1  # beside the axes, never over the data
        assert any("near" in t or "higher" in t or "more" in t for t in texts), texts
