"""The trained-model track as the 15_trained_model report runs it (small token budget), and how the summary uses it."""
from __future__ import annotations

import json

import pytest

from fishlab import trained_track, workbook
from fishlab.trained import convert_gguf, smollm2_gguf
from fishlab.trained_track import RESULTS_FILE, linear_bits_per_weight, phase_table


@pytest.fixture(scope="module")
def track_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("track")
    ckpt = convert_gguf(smollm2_gguf(), d / "smollm2")
    out = d / "run"
    data = workbook.trained_model_results(out, d / "work", ["1b", "2a", "2c", "spare-fast"],
                                          methods=["int4a-g128-rtn", "int3-g128-mse"], n_chunks=2, ctx=128,
                                          sensitivity={"phases": ["1b", "2c"], "layers_per_group": 15, "ctx": 64},
                                          allocation={"budget_phase": "1b", "name": "mixed-1b"}, ckpt=ckpt)
    return out, data


def test_track_runs_every_phase_once_per_scheme_and_writes_its_side_file(track_run):
    out, data = track_run
    assert json.loads((out / RESULTS_FILE).read_text())["format"] == "fishlab trained_model v2"
    rows = {r["phase"]: r for r in phase_table(data)}
    assert list(rows) == ["1b", "2a", "2c", "spare-fast", "mixed-1b"]
    for same in ("2a", "spare-fast"):                    # the same values on a text LM (no fast AR): measured once
        assert rows[same]["same_as"] == "1b" and rows[same]["kl_mean"] == rows["1b"]["kl_mean"]
    assert 0 < rows["1b"]["kl_mean"] < rows["2c"]["kl_mean"]
    assert 4.25 < rows["1b"]["bits_per_weight"] < 4.3    # int4 + a float32 scale per 128 (a shorter 5th group of 576)
    e = data["evaluation"]
    assert e["scored_tokens"] == 2 * 64 and e["text"]["set"] == "evaluation" and 3 < e["base_ppl"] < 60
    assert "Paris" in data["base_continuations"]["The capital of France is"]
    sens = data["sensitivity"]
    assert sens["tokens"]["text"]["set"] == "calibration" and len(sens["rows"]) == 2 * 10
    assert all(0 < r["slow_kl_mean"] < rows["2c"]["kl_mean"] for r in sens["rows"])  # a part hurts less than all
    # the allocated phase: an ordinary phase file at 1b's size, measured like any phase
    alloc = data["allocation"]
    m = rows["mixed-1b"]
    assert m["overrides"] > 0 and m["bf16_layout_bytes"] <= rows["1b"]["bf16_layout_bytes"]
    assert alloc["keys"]["allocation"]["transformer_bytes"] == m["bf16_layout_bytes"]
    assert len(alloc["choice_rows"]) == 150
    # methods: a zero-point RTN row and a row for each method; a method this build cannot run says why
    meth = {r["phase"]: r for r in phase_table(data, "methods")}
    assert meth["int4a-g128-rtn"]["zero_point"] and meth["int4a-g128-rtn"]["kl_mean"] > 0
    grid = {g["scheme"]: g for g in trained_track.method_grid(data)}
    assert grid["INT4 g128"]["rtn"] == rows["1b"]["kl_mean"] and "rtn+zp" in grid["INT4 g128"]
    # a phase that spares linears (baicai-style) or has overrides (mixed-1b) is not a method x bits cell
    import copy
    spared = copy.deepcopy(next(r for r in data["phases"] if r["phase"]["name"] == "1b"))
    spared["phase"].update(name="sp", quantizer="gptq", spare={"w2": 1})
    with_spare = dict(data, phases=[*data["phases"], spared])
    assert trained_track.method_grid(with_spare) == trained_track.method_grid(data)
    assert "gptq" not in {k for g in trained_track.method_grid(with_spare) for k in g}
    targets = trained_track.issue_targets(data)
    assert len(targets) == 4 and all(t["status"] in ("met", "NOT met", "not measured") for t in targets)
    assert targets[3]["status"] in ("met", "NOT met") and "mixed-1b" in targets[3]["measured"]
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
