"""The architecture report's tables (fishlab.report.architecture) on S2 Pro's config and size analysis, and on
the demo checkpoint as the loader inspects it."""
from fishlab import manifest
from fishlab.checkpoint import inspect_checkpoint
from fishlab.config import load_config, preset
from fishlab.demo import build_demo_checkpoint
from fishlab.phases import load_phases
from fishlab.report import architecture as report
from fishlab.report.tables import fmt_bytes
from fishlab.sizes import size_analysis

S2 = preset("s2-pro")


def test_config_tables_show_s2pro_facts():
    t = report.transformer_table(S2)
    assert "DualAR transformer" in t and "155,776 (tied)" in t and "32 / 8" in t and "9,728" in t
    c = report.codec_table(S2)
    assert "44100 Hz" in c and "21.533 frames/s" in c
    comp = report.component_table(S2)
    by = manifest.totals(manifest.transformer_manifest(S2.transformer) + manifest.codec_manifest(S2.codec), "component")
    for k, v in by.items():
        assert k in comp and fmt_bytes(v["bytes"]) in comp
    groups = report.parameter_groups(S2)
    assert sum(v["params"] for v in groups.values()) == sum(v["params"] for v in by.values())
    assert any(k.startswith("codec/") for k in groups)


def test_size_tables_and_traffic_sentence():
    a = size_analysis(S2, load_phases())
    est = report.estimates_table(a)
    assert all(r["label"] in est for r in a["estimates"])
    rec = report.reconciliation_table(a)
    assert all(r["published"] in rec for r in a["reconciliation"])
    assert "fast_ar" in report.traffic_table(a)
    text = report.traffic_text(a).data
    bf16 = a["traffic_per_frame"]["bf16"]
    assert f"**fast_ar** moves the most bytes per frame ({bf16['fast_ar'] / bf16['total']:.0%}" in text
    assert f"{bf16['total'] * a['frames_per_second'] / 1e9:.0f} GB/s" in text
    assert "4,561,852,416 transformer parameters" in report.model_text(S2, a, "params").data


def test_checkpoint_section_lists_the_files_on_disk(tmp_path):
    src = build_demo_checkpoint(tmp_path / "demo")
    ck = inspect_checkpoint(src, load_config(src).transformer)
    table, text = report.checkpoint_section(ck)
    for name, size in ck["files"].items():
        assert name in table and fmt_bytes(size) in table
    assert f"{ck['tensors']} tensors" in text.data
