"""fishlab export-gguf: the demo checkpoint exported in every type fishlab writes, read back with gguf-py's
GGUFReader and checked tensor by tensor against the source (benchmarks/bench_export_gguf.py's `verify`, an
oracle that re-derives names and folding without fishlab's layout module); the header keys exactly as
../shared/spec/gguf-s2cpp.md lists them; phases mapped to their nearest type or refused; the real codec
geometry through the benchmark script, run once."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import gguf
import pytest

from fishlab import gguf_layout as L
from fishlab.cli import main
from fishlab.config import preset
from fishlab.demo import build_demo_checkpoint, checkpoint_digest
from fishlab.export import gguf as export
from fishlab.manifest import linear_targets, transformer_manifest
from fishlab.phases import load_phase
from fishlab.quant.apply import quantize_checkpoint

from conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_export_gguf", REPO / "benchmarks" / "bench_export_gguf.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# the header of gguf-s2cpp.md, key by key
ARCH_KEYS = ["context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
             "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size"]
S2_KEYS = ["model_type", "codebook_size", "num_codebooks", "semantic_begin_id", "semantic_end_id",
           "audio_pad_token_id", "scale_codebook_embeddings", "norm_fastlayer_input", "tie_word_embeddings",
           "attention_qk_norm", "fast_context_length", "fast_embedding_length", "fast_feed_forward_length",
           "fast_block_count", "fast_head_count", "fast_head_count_kv", "fast_head_dim", "fast_rope_freq_base",
           "fast_layer_norm_rms_eps", "fast_tie_word_embeddings", "fast_attention_qk_norm",
           "fast_attention_qkv_bias", "fast_attention_o_bias", "fast_project_in"]
S2PRO_CODEC = {
    "sample_rate": 44100, "hop_length": 512, "frame_length": 512, "encoder_dim": 64, "decoder_dim": 1536,
    "latent_dim": 1024, "encoder_rates": [2, 4, 8, 8], "decoder_rates": [8, 8, 4, 2],
    "encoder_transformer_layers": [0, 0, 0, 4], "decoder_transformer_layers": [4, 0, 0, 0],
    "quantizer_type": "downsample_residual_vector_quantize", "quantizer_input_dim": 1024,
    "quantizer_codebook_dim": 8, "quantizer_residual_codebooks": 9, "quantizer_residual_codebook_size": 1024,
    "quantizer_semantic_codebook_size": 4096, "quantizer_downsample_factor": [2, 2],
    "transformer.block_size": 8192, "transformer.n_local_heads": -1, "transformer.head_dim": 64,
    "transformer.rope_freq_base": 10000.0, "transformer.layer_norm_rms_eps": 1e-5,
    "rvq_transformer.window_size": 128, "rvq_transformer.block_size": 2048, "rvq_transformer.n_layer": 8,
    "rvq_transformer.n_head": 16, "rvq_transformer.n_local_heads": -1, "rvq_transformer.head_dim": 64,
    "rvq_transformer.dim": 1024, "rvq_transformer.feed_forward_length": 3072,
    "rvq_transformer.rope_freq_base": 10000.0, "rvq_transformer.layer_norm_rms_eps": 1e-5,
}
GENERAL = {"general.architecture", "general.name", "general.basename", "general.description", "general.file_type"}


def expected_keys(quantized: bool) -> set[str]:
    return (GENERAL | ({"general.quantization_version"} if quantized else set())
            | {f"fish-speech.{k}" for k in ARCH_KEYS} | {f"fish_speech.{k}" for k in S2_KEYS}
            | {f"fish_speech.codec.{k}" for k in S2PRO_CODEC})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("gguf") / "demo")


@pytest.mark.parametrize("type_name", ["f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_tensor_reads_back_as_the_source(demo, tmp_path, type_name):
    out = tmp_path / f"demo-{type_name}.gguf"
    r = export.export_gguf(demo, out, type_name)
    v = bench.verify(out, demo)                    # names, order, values (see the oracle's docstring)
    wanted = L.TYPES[type_name].name
    for s in transformer_manifest(preset("demo").transformer):
        assert v["types"][L.transformer_name(s.name)] == ("F32" if len(s.shape) == 1 else wanted), s.name
    codec = {n: t for n, t in v["types"].items() if n.startswith("c.")}
    assert set(codec.values()) == {"F16", "F32"}
    assert codec["c.decoder.model.0.conv.weight"] == "F16" and codec["c.decoder.model.0.conv.bias"] == "F32"
    assert r["bytes"] == out.stat().st_size and not r["fallbacks"]
    assert set(v["header"]) == expected_keys(quantized=type_name not in ("f16", "f32", "bf16"))
    if type_name in ("q8_0", "q4_0"):          # within their block error (asserted per block in verify)
        assert bench.BLOCK_ERROR[wanted] / 2 < v["max_block_error"][wanted] <= bench.block_error_bound(wanted)


def test_header_values_come_from_the_config(demo, tmp_path):
    out = tmp_path / "demo.gguf"
    export.export_gguf(demo, out, "q8_0")
    h = bench.header(gguf.GGUFReader(out))
    t = preset("demo").transformer
    assert h["general.architecture"] == "fish-speech" and h["general.file_type"] == 7
    assert (h["fish-speech.embedding_length"], h["fish-speech.block_count"], h["fish-speech.vocab_size"],
            h["fish-speech.attention.head_count"], h["fish-speech.attention.head_count_kv"],
            h["fish-speech.context_length"]) == (t.dim, t.n_layer, t.vocab_size, t.n_head, t.n_local_heads, 4096)
    assert h["fish-speech.rope.freq_base"] == 1e6 and h["fish-speech.attention.layer_norm_rms_epsilon"] == \
        pytest.approx(1e-6)
    assert (h["fish_speech.semantic_begin_id"], h["fish_speech.semantic_end_id"]) == (t.semantic_begin_id,
                                                                                    t.semantic_end_id)
    assert h["fish_speech.model_type"] == "dual_ar" and h["fish_speech.fast_project_in"] is False
    assert h["fish_speech.fast_context_length"] == 11 and h["fish_speech.fast_head_dim"] == 64
    assert "SYNTHETIC" in h["general.description"]


def test_s2pro_header_values_match_the_spec():
    keys = {k: v for k, v, _ in L.transformer_keys(preset("s2-pro").transformer)}
    assert {k.removeprefix("fish-speech."): v for k, v in keys.items() if k.startswith("fish-speech.")} == {
        "context_length": 32768, "embedding_length": 2560, "feed_forward_length": 9728, "block_count": 36,
        "attention.head_count": 32, "attention.head_count_kv": 8, "rope.freq_base": 1e6,
        "attention.layer_norm_rms_epsilon": 1e-6, "vocab_size": 155776}
    assert (keys["fish_speech.codebook_size"], keys["fish_speech.num_codebooks"], keys["fish_speech.semantic_begin_id"],
            keys["fish_speech.semantic_end_id"], keys["fish_speech.audio_pad_token_id"],
            keys["fish_speech.fast_block_count"]) == (4096, 10, 151678, 155773, 151677, 4)
    codec = {k.removeprefix("fish_speech.codec."): v for k, v, _ in L.codec_keys(preset("s2-pro").codec)}
    assert codec == S2PRO_CODEC


def test_a_phase_maps_to_its_nearest_type_on_its_target_only(demo, tmp_path):
    out = tmp_path / "1b.gguf"
    r = export.export_gguf(demo, out, phase=load_phase("1b"))
    assert r["type"] == "q4_0" and "Q4_0" in r["mapping"]
    types = bench.verify(out, demo)["types"]
    cfg = preset("demo").transformer
    slow = {L.transformer_name(s.name) for s in linear_targets(cfg, "slow")}
    for s in transformer_manifest(cfg):
        n = L.transformer_name(s.name)
        assert types[n] == ("Q4_0" if n in slow else "F32" if len(s.shape) == 1 else "F16"), n
    assert export.export_gguf(demo, tmp_path / "2b.gguf", phase=load_phase("2b"))["type"] == "q8_0"
    for name, why in (("1a", "no FP8 type"), ("2c", "K-quants"), ("3a", "TQ2_0")):
        with pytest.raises(L.NoGGUFEquivalent, match=why):
            export.export_gguf(demo, tmp_path / f"{name}.gguf", phase=load_phase(name))
        assert not (tmp_path / f"{name}.gguf").exists()


def test_an_interrupted_export_leaves_nothing_and_the_input_is_untouched(demo, tmp_path, monkeypatch):
    before = checkpoint_digest(demo)
    real = export._convert

    def failing(block, t, name):
        if name == "layers.1.feed_forward.w2.weight":
            raise OSError("disk full (simulated)")
        return real(block, t, name)

    monkeypatch.setattr(export, "_convert", failing)
    with pytest.raises(OSError, match="simulated"):
        export.export_gguf(demo, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
    assert checkpoint_digest(demo) == before


def test_refusals_name_the_problem(demo, tmp_path):
    quantize_checkpoint(demo, tmp_path / "q1b", load_phase("1b"), with_metrics=False)
    with pytest.raises(export.ExportError, match="quantized checkpoint"):
        export.export_gguf(tmp_path / "q1b", tmp_path / "x.gguf")
    with pytest.raises(export.ExportError, match="unknown GGUF type 'q4_k'"):
        export.export_gguf(demo, tmp_path / "x.gguf", "q4_k")
    (tmp_path / "y.gguf").write_bytes(b"")
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_gguf(demo, tmp_path / "y.gguf")


def test_cli(demo, tmp_path, capsys):
    assert main(["export-gguf", "--checkpoint", str(demo), "--type", "q8_0", "--out", str(tmp_path / "a.gguf")]) == 0
    out = capsys.readouterr().out
    assert "a.gguf" in out and "Q8_0" in out and "s2.cpp will not load" in out
    assert main(["export-gguf", "--checkpoint", str(demo), "--phase", "1a", "--out", str(tmp_path / "b.gguf")]) == 2
    assert "no FP8 type" in capsys.readouterr().err


@pytest.mark.slow
def test_real_codec_geometry_through_the_benchmark_script():
    """The demo transformer with S2 Pro's codec (391 M values, a 1.6 GB codec.pth): what s2.cpp needs. The
    script builds it in a temp dir, exports in a child process, reads every tensor back and checks it."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_export_gguf.py"), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    codec = {k.removeprefix("fish_speech.codec."): v for k, v in r["header"].items()
             if k.startswith("fish_speech.codec.")}
    for k, v in S2PRO_CODEC.items():
        assert codec[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert set(r["header"]) == expected_keys(quantized=False)
    assert not any("will not load" in n for n in r["notes"])     # the S2 Pro geometry
    codec_specs = bench.codec_manifest(preset("s2-pro").codec)
    n_pairs = sum(1 for s in codec_specs if s.name.endswith(("original0", "weight_g")))
    assert r["tensors"] == len(transformer_manifest(preset("demo").transformer)) + len(codec_specs) - n_pairs
    assert r["types"] == {"F16": r["types"]["F16"], "F32": r["types"]["F32"]}
