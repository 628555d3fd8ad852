"""The default workbook end to end, as the README's first command runs it: every notebook through the runner on
CPU, into a fresh renders folder, with the demo checkpoint built from scratch."""
import json
import re
import subprocess
import sys

import pytest

from fishlab.config import preset
from fishlab.manifest import linear_targets
from fishlab.runner import run


@pytest.fixture(scope="module")
def default_run(repo, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("FISHLAB_CACHE", str(cache))          # the demo checkpoint is built by the run itself
    renders = tmp_path_factory.mktemp("renders")
    try:
        result = run(repo / "params" / "default.yaml", notebooks_dir=repo / "notebooks", renders_dir=renders)
    finally:
        mp.undo()
    return result, renders / "default", cache


def test_every_report_renders(default_run):
    result, run_dir, cache = default_run
    assert result.ok, [(r.name, r.status, r.reason) for r in result.reports if not r.ok]
    names = [r.name for r in result.reports]
    assert names == ["00_architecture", "15_trained_model"] + \
        [f"10_phase-{p}" for p in ("1a", "1b", "2a", "2b", "2c", "3a", "3b")] + ["20_layer_errors", "30_listen", "90_summary"]
    index = (run_dir / "index.html").read_text()
    for n in names:
        assert f"{n}.html" in index and (run_dir / f"{n}.html").exists() and (run_dir / f"{n}.ipynb").exists()
    assert any(cache.iterdir()), "the demo checkpoint was built in FISHLAB_CACHE"


def test_reports_are_self_contained(default_run):
    _, run_dir, _ = default_run
    for page in run_dir.glob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=[\"']?https?://", text), page.name
        assert not re.search(r"<link[^>]+href=[\"']?https?://", text), page.name
    arch = (run_dir / "00_architecture.html").read_text()
    assert arch.count("<table") >= 5 and arch.count("data:image/png;base64") >= 4
    assert "4,561,852,416" in arch and "391,430,530" in arch
    phase = (run_dir / "10_phase-3b.html").read_text()
    assert "SYNTHETIC" in phase and "data:image/png;base64" in phase
    assert "def " not in phase and "import " not in phase       # code hidden by default


def test_side_files_carry_the_numbers(default_run):
    _, run_dir, _ = default_run
    sa = json.loads((run_dir / "size_analysis.json").read_text())
    assert sa["model"] == "s2-pro" and sa["params"] == {"transformer": 4_561_852_416, "codec": 391_430_530}
    assert sa["estimates"][0]["transformer_bytes"] == 2 * 4_561_852_416
    res = json.loads((run_dir / "all_results.json").read_text())
    assert sorted(res["phases"]) == ["1a", "1b", "2a", "2b", "2c", "3a", "3b"] and res["synthetic"]
    for name, p in res["phases"].items():
        assert abs(p["sizes"]["measured_vs_predicted_pct"]) < 1.0, name
        assert p["errors"]["tensors"] == len(linear_targets(preset("demo").transformer, p["phase"]["target"]))
    err = {k: v["errors"]["rel_fro_mean"] for k, v in res["phases"].items()}
    assert err["2b"] < err["1b"] < err["2c"] < err["3a"]       # coarser schemes, larger weight error
    assert res["pareto_size_vs_weight_error"]
    tm = res["trained_model"]                                   # every phase file ran on the trained proxy
    kl = {r["phase"]: r["kl_mean"] for r in tm["phases"]}
    assert sorted(kl) == sorted(["1a", "1b", "2a", "2b", "2c", "3a", "3b", "q4_0", "q8_0", "spare-fast", "baicai-style",
                                 "mixed-1b"])
    assert kl["q8_0"] < kl["2b"] < kl["q4_0"] < kl["1b"] < kl["2c"] < kl["3a"]
    assert res["phases"]["1b"]["trained"]["kl_mean"] == kl["1b"]
    # issue 10 on the trained model: methods x bits, the four targets, sensitivity and the allocated phase
    assert [t["status"] in ("met", "NOT met", "not measured") for t in tm["targets"]] == [True] * 4
    assert tm["targets"][3]["status"] != "not measured"                       # mixed-1b was measured
    # with GPTQ (act-order, zero points) among the default methods every target is met, by wide margins
    # (INT4 0.088 vs 0.394, INT3 0.417 vs 0.657, INT2 1.94 vs 2.61, mixed 0.14 vs 0.66 on 2026-12-03)
    assert [t["status"] for t in tm["targets"]] == ["met"] * 4, tm["targets"]
    spared = [(r["projection"], r["linear"]) for r in tm["spared"] if r["phase"] == "baicai-style"]
    assert sorted(p for p, _ in spared) == ["w2"] * 7 + ["wo"] * 2, spared       # resolved on the trained model
    assert all(lin.endswith(p) for p, lin in spared)
    assert {g["scheme"] for g in tm["method_grid"]} >= {"INT4 g128", "INT3 g128", "INT2 g64"}
    assert "gptq" not in next(g for g in tm["method_grid"] if g["scheme"] == "INT4 g32")   # baicai-style spares
    assert tm["sensitivity"]["tokens"]["text"]["set"] == "calibration" and tm["allocation"]["choice_rows"]


def test_every_phase_has_valid_samples_players_and_fidelity(default_run):
    import numpy as np
    import soundfile as sf

    _, run_dir, _ = default_run
    res = json.loads((run_dir / "all_results.json").read_text())
    for name in ["base", *res["phases"]]:
        for kind in ("tts", "clone"):
            audio, sr = sf.read(run_dir / "audio" / f"{name}_{kind}.wav")
            assert sr == 44100 and len(audio) > 0 and np.isfinite(audio).all(), (name, kind)
    for name, p in res["phases"].items():
        lis = p["listening"]
        assert lis["slow_kl_mean"] >= 0 and 0 <= lis["slow_top1"] <= 1 and lis["frames_per_s"] > 0, name
        assert -1 <= lis["speaker_clone_vs_reference"] <= 1
        html = (run_dir / f"10_phase-{name}.html").read_text()
        assert html.count("<audio") >= 5 and 'src="data:audio/wav;base64,' in html, name
        assert "is noise, not speech" in html
        assert "Word / character error rate (pocketsphinx)" in html
        assert 0 <= lis["wer_tts"] and lis["asr"] == "pocketsphinx"
    listen = (run_dir / "30_listen.html").read_text()
    assert listen.count("<audio") == 2 * (len(res["phases"]) + 1) + 1     # tts: base + phases; clone: + reference
    assert "application/vnd.jupyter.widget" not in listen          # static page, no widget state
    summary = (run_dir / "90_summary.html").read_text()
    assert "Size vs KL" in summary and "ranked by the word error rate" in summary
    trained = (run_dir / "15_trained_model.html").read_text()
    assert "Paris" in trained and "llama.cpp" in trained and "Q4_1" in trained
    assert trained.count("data:image/png;base64") >= 6     # KL vs bits, methods Pareto, 3 sensitivity maps, allocation
    assert "Issue 10&#x27;s targets" in trained or "Issue 10's targets" in trained


def test_a_notebook_runs_with_plain_papermill(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("FISHLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(repo / "notebooks" / "10_phase.ipynb"), str(out),
                           "-f", str(repo / "params" / "2a.yaml"), "-p", "output_dir", str(tmp_path),
                           "-p", "report_name", "p2a", "-p", "tts", "False", "--no-progress-bar"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads((tmp_path / "p2a.metrics.json").read_text())
    assert side["phase"]["name"] == "2a" and side["phase"]["target"] == "all"
