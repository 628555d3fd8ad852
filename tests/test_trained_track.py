"""The trained-model track as the 15_trained_model report runs it (small token budget), and how the summary uses it."""
from __future__ import annotations

import json

import pytest

from fishlab import workbook
from fishlab.trained import convert_gguf, smollm2_gguf
from fishlab.trained_track import RESULTS_FILE, linear_bits_per_weight, phase_table


@pytest.fixture(scope="module")
def track_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("track")
    ckpt = convert_gguf(smollm2_gguf(), d / "smollm2")
    out = d / "run"
    data = workbook.trained_model_results(out, d / "work", ["1b", "2a", "2c"], n_chunks=2, ctx=128,
                                          sensitivity_phase="2c", sensitivity_groups=3, ckpt=ckpt)
    return out, data


def test_track_runs_every_phase_once_per_scheme_and_writes_its_side_file(track_run):
    out, data = track_run
    assert json.loads((out / RESULTS_FILE).read_text())["format"] == "fishlab trained_model v1"
    rows = {r["phase"]: r for r in phase_table(data)}
    assert list(rows) == ["1b", "2a", "2c"]
    assert rows["2a"]["same_as"] == "1b" and rows["2a"]["kl_mean"] == rows["1b"]["kl_mean"]   # same scheme on a text LM
    assert 0 < rows["1b"]["kl_mean"] < rows["2c"]["kl_mean"]
    assert 4.25 < rows["1b"]["bits_per_weight"] < 4.3    # int4 + a float32 scale per 128 (a shorter 5th group of 576)
    e = data["evaluation"]
    assert e["scored_tokens"] == 2 * 64 and e["text"]["set"] == "evaluation" and 3 < e["base_ppl"] < 60
    assert "Paris" in data["base_continuations"]["The capital of France is"]
    sens = data["sensitivity"]["rows"]
    assert [r["group"] for r in sens] == ["slow 0-9", "slow 10-19", "slow 20-29"] and all(r["n_linears"] == 50 for r in sens)
    assert all(0 < r["slow_kl_mean"] < rows["2c"]["kl_mean"] for r in sens)  # a third of the layers hurts less
    b = data["bf16_check"]
    assert 0 < b["not_exact_in_bf16"] < 1 and 0 < b["fidelity"]["slow_kl_mean"] < rows["1b"]["kl_mean"]


def test_summary_uses_the_trained_kl_when_the_s2pro_weights_are_synthetic(track_run):
    out, data = track_run
    phases = {n: {"phase": {"name": n}, "label": n, "synthetic": True, "errors": {"rel_fro_mean": 0.1},
                  "sizes": {"s2pro_predicted_total_gb": gb, "measured_bytes": int(gb * 1e9)},
                  "listening": {"slow_kl_mean": 1.0, "fast_kl_mean": 1.0, "wer_tts": w, "cer_tts": w / 2,
                                "wer_clone": w, "cer_clone": w / 2, "wer_base_tts": 0.9, "asr": "pocketsphinx"}}
              for n, gb, w in (("1b", 5.0, 0.8), ("2c", 4.0, 0.6))}
    for name, p in phases.items():
        (out / f"10_phase-{name}.metrics.json").write_text(json.dumps(p))
    res = workbook.collect_results(out)
    assert res["trained_model"]["phases"][0]["phase"] == "1b" and res["phases"]["2c"]["trained"]["kl_mean"] > 0
    kp = workbook.kl_points(res)
    assert kp["trained"] and kp["names"] == ["1b", "2c"]
    assert [y for _, y in kp["points"]] == [res["phases"][n]["trained"]["kl_mean"] for n in ("1b", "2c")]
    assert [r["phase"] for r in workbook.wer_ranking(res)] == ["2c", "1b"]
    for p in phases.values():
        p["synthetic"] = False
        (out / f"10_phase-{p['phase']['name']}.metrics.json").write_text(json.dumps(p))
    kp = workbook.kl_points(workbook.collect_results(out))
    assert not kp["trained"] and [y for _, y in kp["points"]] == [2.0, 2.0]   # real S2 Pro: its own KL


def test_bits_per_weight_counts_the_scales():
    from fishlab.config import preset
    from fishlab.phases import load_phase
    cfg = preset("demo")
    assert linear_bits_per_weight(cfg, load_phase("q8_0")) == pytest.approx(8 + 16 / 32)   # GGUF Q8_0: 8.5
    assert linear_bits_per_weight(cfg, load_phase("q4_0")) == pytest.approx(4 + 16 / 32)   # GGUF Q4_0: 4.5
