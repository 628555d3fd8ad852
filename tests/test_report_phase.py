"""The phase report's tables (fishlab.report.phase) on a real side file: the one 10_phase wrote for phase 1b
in the session's measured run (conftest.measured_run: demo checkpoint, samples, KL, speaker similarity, WER)."""
import json

from fishlab.report import phase as report
from fishlab.report.tables import fmt_bytes, fmt_num


def _side(measured_run):
    return json.loads((measured_run["run"] / "10_phase-1b.metrics.json").read_text())


def test_size_and_error_sections_show_the_side_files_numbers(measured_run):
    s = _side(measured_run)
    html = report.size_table(s)
    for key in ("measured_bytes", "predicted_bytes", "source_bytes", "s2pro_predicted_transformer_bytes"):
        assert fmt_bytes(s["sizes"][key]) in html
    assert f"{s['sizes']['measured_vs_predicted_pct']:+.2f}%" in report.size_text(s).data
    assert f"{s['errors']['rel_fro_mean']:.4f}" in report.error_text(s).data
    by_comp, by_proj = report.error_tables(s)
    assert "By component" in by_comp and "slow_ar" in by_comp
    for proj in s["errors"]["by_projection"]:
        assert proj in by_proj
    worst = report.worst_tensors_table(s)
    assert all(r["tensor"] in worst for r in s["worst_tensors"])


def test_listening_section_lists_every_sample_and_measure(measured_run):
    s = _side(measured_run)
    lis = s["listening_detail"]
    clips = report.clip_paths(lis, "1b")
    assert list(clips) == ["reference", "base · tts", "1b · tts", "base · clone", "1b · clone"]
    assert all(p.endswith(".wav") for p in clips.values())
    grid = report.listening_rows(clips, "1b")
    assert grid["speech (clone)"] == {"reference": clips["reference"], "base": clips["base · clone"],
                                      "1b": clips["1b · clone"]}
    rows = report.generation_rows(lis, "1b")
    assert [r["sample"] for r in rows] == ["base tts", "base clone", "1b tts", "1b clone"]
    assert rows[2]["frames"] == lis["samples"]["tts"]["frames"]
    parts = report.listening_tables(lis, "1b")
    fid = parts[0]
    assert fmt_num(lis["fidelity"]["slow_kl_mean"]) in fid and fmt_num(lis["fidelity"]["fast_top1"]) in fid
    assert "Which layers hurt" not in "".join(map(str, parts))       # the run measured no layer groups
    assert any("Word / character error rate" in str(p) for p in parts)
    with_groups = dict(lis, kl_by_layer_group=[{"group": "slow 0-8", "n_linears": 45, "slow_kl_mean": 0.25,
                                                 "fast_kl_mean": 0.125}])
    assert "Which layers hurt" in report.fidelity_tables(with_groups)[-1]
    assert "slow 0-8" in report.fidelity_tables(with_groups)[-1]
