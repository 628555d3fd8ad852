import copy
import json

import pytest

from fishlab.config import (CodecConfig, ConfigError, DualARConfig, load_codec_config, load_config,
                            load_transformer_config, preset)


def test_s2pro_preset_has_the_spec_numbers():
    t = preset("s2-pro").transformer
    assert (t.n_layer, t.dim, t.n_head, t.n_local_heads, t.head_dim) == (36, 2560, 32, 8, 128)
    assert (t.q_width, t.kv_width, t.qkv_rows) == (4096, 1024, 6144)
    assert (t.vocab_size, t.codebook_size, t.num_codebooks, t.fast_n_layer) == (155776, 4096, 10, 4)
    assert (t.semantic_begin_id, t.semantic_end_id, t.eos_token_id) == (151678, 155773, 151645)
    assert t.n_semantic == 4096 and not t.has_fast_project_in
    c = preset("s2-pro").codec
    assert (c.hop_length, c.frame_length, c.n_codebooks) == (512, 2048, 10)
    assert c.frames_per_second == pytest.approx(21.533203125)
    assert c.encoder_stage_dims == (128, 256, 512, 1024)
    assert c.decoder_stage_dims == (1536, 768, 384, 192, 96)
    et = c.encoder_transformer(3)
    assert (et.n_layer, et.dim, et.n_head, et.head_dim, et.intermediate_size, et.window) == (4, 1024, 16, 64, 3072, 512)
    assert c.encoder_transformer(0) is None


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 's3'.*demo.*s2-pro"):
        preset("s3")
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-dir-or-preset")


def test_golden_config_reads_like_the_reference(golden_dir):
    t = load_transformer_config(golden_dir / "transformer")
    assert t.dtype == "float32"
    assert (t.dim, t.head_dim, t.q_width, t.intermediate_size) == (64, 32, 128, 176)
    assert (t.fast_n_layer, t.codebook_size, t.num_codebooks) == (1, 32, 4)
    assert (t.semantic_begin_id, t.semantic_end_id) == (286, 317)
    c = load_codec_config(golden_dir / "codec")
    assert (c.encoder_dim, c.latent_dim, c.decoder_dim, c.frame_length) == (4, 64, 48, 2048)
    assert (c.semantic_codebook_size, c.n_residual_codebooks, c.residual_codebook_size) == (32, 3, 16)
    assert c.quantizer_transformer.window == 4 and c.encoder_transformer(3).n_head == 1


def test_reference_fallbacks_and_inheritance():
    d = preset("s2-pro").transformer.to_hf_dict()
    for k in ("head_dim", "intermediate_size", "n_local_heads", "rope_base", "norm_eps"):
        del d["text_config"][k]
    for k in ("n_layer", "head_dim", "intermediate_size", "dim"):
        d["audio_decoder_config"][k] = None
    c = DualARConfig.from_hf_dict(d)
    assert c.head_dim == 64                 # dataclass default, not dim / n_head = 80
    assert c.intermediate_size == 6912      # 8*2560/3 = 6826 rounded up to a multiple of 256
    assert c.n_local_heads == 32 and c.rope_base == 10000.0 and c.norm_eps == 1e-5
    assert (c.fast_n_layer, c.fast_head_dim, c.fast_intermediate_size, c.fast_dim) == (36, 64, 6912, 2560)


def test_bad_configs_name_the_file_and_field(tmp_path):
    good = preset("s2-pro").transformer.to_hf_dict()
    cases = {
        "model_type": (lambda d: d.update(model_type="llama"), "model_type is 'llama'"),
        "section": (lambda d: d.pop("audio_decoder_config"), "audio_decoder_config"),
        "bias": (lambda d: d["text_config"].update(attention_qkv_bias=True), "attention_qkv_bias"),
        "heads": (lambda d: d["text_config"].update(n_local_heads=5), "multiple of n_local_heads"),
        "semantic": (lambda d: d.update(semantic_end_token_id=10 ** 6), "semantic ids"),
        "vocab": (lambda d: d["text_config"].pop("vocab_size"), "text_config.vocab_size is missing"),
    }
    for name, (mutate, msg) in cases.items():
        d = copy.deepcopy(good)
        mutate(d)
        p = tmp_path / name / "config.json"
        p.parent.mkdir()
        p.write_text(json.dumps(d))
        with pytest.raises(ConfigError, match=msg) as e:
            load_transformer_config(p.parent)
        assert str(p) in str(e.value)
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_transformer_config(bad)


def test_config_round_trips():
    for name in ("s2-pro", "demo"):
        cfg = preset(name)
        assert DualARConfig.from_hf_dict(cfg.transformer.to_hf_dict()) == cfg.transformer
        assert CodecConfig.from_json_dict(cfg.codec.to_json_dict()) == cfg.codec


def test_demo_preset_keeps_the_real_token_layout():
    t = preset("demo").transformer
    real = preset("s2-pro").transformer
    base_real, base = 151643, t.eos_token_id - 2
    for f in ("eos_token_id", "pad_token_id", "audio_pad_token_id", "semantic_begin_id"):
        assert getattr(t, f) - base == getattr(real, f) - base_real, f
    assert t.num_codebooks == 10 and t.attention_qk_norm and t.n_head // t.n_local_heads == 4
    assert t.q_width != t.dim  # like S2 Pro (4096 vs 2560): wo is not square
    assert t.n_semantic == preset("demo").codec.semantic_codebook_size == t.codebook_size
