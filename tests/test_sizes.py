import pytest

from fishlab.config import preset
from fishlab.phases import Phase, PhaseError, load_phase, load_phases
from fishlab.sizes import (GB, bf16_estimate, gguf_estimate, load_gguf_types, phase_estimate,
                           quantized_nbytes, size_analysis, traffic_per_frame)

S2 = preset("s2-pro")
SLOW_LINEAR_PARAMS = 36 * (6144 * 2560 + 2560 * 4096 + 3 * 9728 * 2560)   # 3,633,315,840
ALL_LINEAR_PARAMS = SLOW_LINEAR_PARAMS + 4 * (6144 * 2560 + 2560 * 4096 + 3 * 9728 * 2560) + 4096 * 2560


def test_quantized_tensor_bytes_hand_worked():
    assert quantized_nbytes((4, 256), "int", 4, 128, "float32") == {"data": 512, "scales": 4 * 2 * 4}
    assert quantized_nbytes((2, 128), "int", 3, 128, "float32") == {"data": 96, "scales": 8}
    assert quantized_nbytes((3, 10), "fp8", 8, None, "float32") == {"data": 30, "scales": 12}
    assert quantized_nbytes((3, 10), "int", 8, None, "bfloat16") == {"data": 30, "scales": 6}
    # 100 columns in groups of 64: 2 groups per row (the second implied-padded), 200 values packed densely
    assert quantized_nbytes((2, 100), "int", 2, 64, "float32") == {"data": 50, "scales": 16}
    assert quantized_nbytes((1, 9), "int", 3, None, "float32") == {"data": 6, "scales": 4}   # 2 whole INT3 units


def test_s2pro_phase_totals_hand_worked():
    bf16 = bf16_estimate(S2)
    assert bf16.transformer_bytes == 2 * 4_561_852_416
    assert bf16.per_component["codec"] == 4 * 391_430_530
    p1b = phase_estimate(S2, load_phase("1b"))
    assert p1b.quantized_tensors == 180 and p1b.quantized_params == SLOW_LINEAR_PARAMS
    assert p1b.scale_bytes == SLOW_LINEAR_PARAMS // 128 * 4
    assert p1b.transformer_bytes == 2 * 4_561_852_416 - 2 * SLOW_LINEAR_PARAMS + SLOW_LINEAR_PARAMS // 2 \
        + SLOW_LINEAR_PARAMS // 128 * 4
    p2a = phase_estimate(S2, load_phase("2a"))
    assert p2a.quantized_tensors == 201 and p2a.quantized_params == ALL_LINEAR_PARAMS
    p1a = phase_estimate(S2, load_phase("1a"))
    slow_rows = 36 * (6144 + 2560 + 9728 * 2 + 2560)
    assert p1a.transformer_bytes == 2 * 4_561_852_416 - SLOW_LINEAR_PARAMS + slow_rows * 4
    # scale dtype option: bf16 scales halve the scale bytes
    assert phase_estimate(S2, load_phase("3a"), "bfloat16").scale_bytes * 2 == phase_estimate(S2, load_phase("3a")).scale_bytes
    sizes = [phase_estimate(S2, load_phase(p)).transformer_bytes for p in ("2b", "1b", "2c", "3a")]
    assert sizes == sorted(sizes, reverse=True)


def test_gguf_uses_bits_per_weight_on_2d_tensors():
    types = load_gguf_types()
    assert types["Q8_0"] == 8.5 and types["Q2_K"] == 2.625
    q8 = gguf_estimate(S2, "Q8_0", 8.5)
    two_d = 4_561_852_416 - (36 * (128 * 2 + 2560 * 2) + 2560 + 4 * 2560 * 2 + 2560)
    assert q8.per_component["norms"] == 4 * (4_561_852_416 - two_d)          # norms stay F32
    assert q8.per_component["codec"] == 2 * 391_430_530                      # codec F16 as in the GGUF files


def test_traffic_per_frame_counts_the_fast_ar_once_per_codebook():
    tr = traffic_per_frame(S2, lambda s: None)
    fast_linear = 4 * (6144 * 2560 + 2560 * 4096 + 3 * 9728 * 2560) + 4096 * 2560
    assert tr["fast_ar"] == 10 * 2 * fast_linear
    assert tr["slow_ar"] == 2 * SLOW_LINEAR_PARAMS
    assert tr["tied_head"] == 2 * 155776 * 2560
    assert tr["fast_ar"] > tr["slow_ar"]     # the fast AR dominates the bytes moved per frame


def test_size_analysis_reconciles_every_published_entry():
    a = size_analysis(S2, load_phases())
    phases = {r["name"]: r for r in a["estimates"] if r["kind"] == "phase"}
    assert list(phases) == ["1a", "1b", "2a", "2b", "2c", "3a", "3b", "baicai-style", "q4_0", "q8_0", "spare-fast"]
    # the q8_0 phase is GGUF's Q8_0 block scheme (INT8, blocks of 32, fp16 scales): the linears it packs
    # take exactly the bytes the Q8_0 estimate gives them
    gguf_q8 = next(r for r in a["estimates"] if r["name"] == "Q8_0")
    for part in ("slow_ar", "fast_ar"):
        assert phases["q8_0"]["per_component"][part] == gguf_q8["per_component"][part]
    rec = {r["compare_to"]: r for r in a["reconciliation"]}
    assert set(rec) >= {"bf16", "1a", "1b", "F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"}
    assert abs(rec["Q8_0"]["difference_pct"]) < 1.0
    assert abs(rec["1a"]["likely_residual_gb"]) < abs(rec["1a"]["difference_gb"])
    assert "FP8 on every 2-D tensor" in rec["1a"]["likely_layout"]
    assert rec["bf16"]["fishlab_gb"] == pytest.approx((2 * 4_561_852_416 + 4 * 391_430_530) / GB)


def test_phase_registry_errors(tmp_path):
    with pytest.raises(PhaseError, match="unknown phase '9z'.*1a, 1b"):
        load_phase("9z")
    (tmp_path / "x.yaml").write_text("phase: x\nmethod: int\nbits: 5\ntarget: slow\n")
    with pytest.raises(PhaseError, match="x.yaml.*bits must be one of"):
        load_phases(tmp_path)
    (tmp_path / "x.yaml").write_text("phase: x\nmethod: int\nbits: 4\ngroup_size: 128\ntarget: attention\n")
    with pytest.raises(PhaseError, match="unknown target 'attention'"):
        load_phases(tmp_path)
    (tmp_path / "x.yaml").write_text("phase: x\nmethod: int\nbits: 4\ngroup_size: 32\ntarget: all\n")
    (tmp_path / "run.yaml").write_text("preset: demo\n")          # not a phase file: ignored
    assert [p.name for p in load_phases(tmp_path)] == ["x"]
    assert Phase.from_dict({"phase": "y", "method": "fp8", "target": "slow"}).bits == 8
