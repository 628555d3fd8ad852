"""The clean-room codec against a golden set (`$FISHLAB_GOLDEN/codec/`, default ../shared/golden/A), plus the
strict codec.pth loader. Nothing here depends on golden A's sizes: shapes come from the golden files."""
from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fishlab.config import CodecConfig, load_codec_config
from fishlab.manifest import codec_manifest
from fishlab.model import codec as codec_mod
from fishlab.model.codec import Codec, rope_table
from fishlab.model.codec_load import (CheckpointError, load_codec, read_codec_file, stale_buffer_names,
                                      write_codec_pth)

REPO = Path(__file__).resolve().parents[1]
LATENT = dict(atol=5e-5, rtol=1e-4)   # golden README §2 tolerances (float32)
WAVE = dict(atol=2e-5, rtol=0.0)


def golden_dir() -> Path:
    p = Path(os.environ.get("FISHLAB_GOLDEN") or "../shared/golden/A")
    return p if p.is_absolute() else (REPO / p).resolve()


@pytest.fixture(scope="module")
def gdir() -> Path:
    d = golden_dir() / "codec"
    missing = [n for n in ("config.json", "golden.safetensors", "model.safetensors") if not (d / n).is_file()]
    if missing:
        pytest.fail(f"golden codec files missing in {d}: {missing}. Set FISHLAB_GOLDEN to a golden set directory "
                    f"(default <repo>/../shared/golden/A).", pytrace=False)
    return d


@pytest.fixture(scope="module")
def gold(gdir) -> dict:
    return load_file(str(gdir / "golden.safetensors"))


@pytest.fixture(scope="module")
def weights(gdir) -> dict:
    return load_file(str(gdir / "model.safetensors"))


@pytest.fixture(scope="module")
def cfg(gdir) -> CodecConfig:
    return load_codec_config(gdir)


@pytest.fixture(scope="module")
def codec(gdir) -> Codec:
    return load_codec(gdir)


@pytest.fixture(scope="module")
def enc(codec, gold) -> dict:
    return codec.encode_steps(gold["audio_in"])


@pytest.fixture(scope="module")
def dec(codec, gold) -> dict:
    return codec.decode_steps(gold["codes"])


def close(actual, expected, name, atol, rtol):
    actual = actual.float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{name}: max abs error {err:.3g}"


# --- structure ------------------------------------------------------------------------------------------

def test_s2pro_codec_on_meta_matches_manifest():
    with torch.device("meta"):
        model = Codec(CodecConfig())
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(s.name, s.shape) for s in codec_manifest(CodecConfig())]
    assert len(sd) == 535 and sum(t.numel() for t in sd.values()) == 391_430_530   # spec §9
    assert sorted(stale_buffer_names(CodecConfig())) == sorted(
        f"{p}.{s}" for p in ("encoder.block.4.block.5", "quantizer.pre_module", "quantizer.post_module")
        for s in ("freqs_cis", "causal_mask"))


def test_golden_weights_match_model_and_manifest(cfg, weights):
    with torch.device("meta"):
        sd = Codec(cfg).state_dict()
    man = {s.name: s.shape for s in codec_manifest(cfg)}
    assert list(sd) == list(man)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in sd.items()} == man


def test_rope_table_check_values():
    # spec §2.7: base 1e4, d 64, position 5, pairs 0..2, (cos, sin) in bf16
    t = rope_table(6, 64, 10000.0)
    assert t.dtype == torch.bfloat16 and t.shape == (6, 32, 2)
    expected = torch.tensor([[0.283203125, -0.95703125], [-0.8203125, -0.5703125], [-0.9453125, 0.32421875]])
    assert torch.equal(t[5, :3].float(), expected)


# --- encode ---------------------------------------------------------------------------------------------

def test_encoder_intermediates(enc, gold):
    close(enc["latent"], gold["enc_latent"], "enc_latent", **LATENT)
    close(enc["downsampled"], gold["enc_downsampled"], "enc_downsampled", **LATENT)
    close(enc["pre_module"], gold["enc_pre_module"], "enc_pre_module", **LATENT)


def test_codes(codec, enc, gold):
    codes, ref, margins = enc["codes"], gold["codes"], gold["code_margins"]
    assert codes.dtype == torch.int64 and codes.shape == ref.shape
    latent_err = (enc["pre_module"].float() - gold["enc_pre_module"]).abs().max().item()
    # a flip is acceptable only as a near-tie: the first differing codebook of a frame must have a margin
    # below ~10x our latent error; the later codebooks of that frame then legitimately differ too
    for b, t in {(int(b), int(t)) for b, _, t in (codes != ref).nonzero()}:
        row = int((codes[b, :, t] != ref[b, :, t]).nonzero()[0])
        assert margins[row, t] < 10 * latent_err, (
            f"code [{b},{row},{t}] = {int(codes[b, row, t])}, golden {int(ref[b, row, t])}, margin "
            f"{float(margins[row, t]):.3g} is no tie (latent error {latent_err:.3g})")
    assert torch.equal(codes, ref), "codes differ from golden (only at near-ties, see above)"
    assert torch.equal(codec.encode(gold["audio_in"][:, 0]), ref)   # the public entry point, [B, N] form


def test_code_lengths(codec, enc, gold):
    assert torch.equal(codec.code_lengths(gold["audio_lengths"]), gold["code_lengths"])
    assert enc["codes"].shape[-1] == int(gold["code_lengths"].max())


def test_encode_pads_to_whole_frames(codec, gold):
    audio = gold["audio_in"][..., : gold["audio_in"].shape[-1] - codec.frame_length // 3]
    codes = codec.encode(audio)
    assert codes.shape[-1] == -(-audio.shape[-1] // codec.frame_length)
    assert torch.equal(codes, codec.encode(F.pad(audio, (0, codec.frame_length // 3))))


def test_encode_is_causal(codec, gold):
    T = gold["codes"].shape[-1]
    half = T // 2
    codes = codec.encode(gold["audio_in"][..., : half * codec.frame_length])
    assert torch.equal(codes, gold["codes"][..., :half])


# --- decode ---------------------------------------------------------------------------------------------

def test_decoder_intermediates(dec, gold):
    close(dec["z_q"], gold["dec_zq"], "dec_zq", **LATENT)
    close(dec["post_module"], gold["dec_post_module"], "dec_post_module", **LATENT)
    close(dec["upsampled"], gold["dec_upsampled"], "dec_upsampled", **LATENT)
    close(dec["audio"], gold["audio_out"], "audio_out", **WAVE)


def test_decode_public(codec, gold):
    audio = codec.decode(gold["codes"])
    assert audio.shape == (gold["codes"].shape[0], 1, codec.frame_length * gold["codes"].shape[-1])
    close(audio, gold["audio_out"], "audio_out", **WAVE)


def test_decode_clamps_a_copy(codec, gold):
    codes = gold["random_codes"].clone()
    assert torch.equal(codec.clamp_codes(codes), gold["random_codes_clamped"])
    audio = codec.decode(codes)
    assert torch.equal(codes, gold["random_codes"]), "decode must not modify the caller's codes"
    close(audio, gold["audio_from_random_codes"], "audio_from_random_codes", **WAVE)


def test_decode_rejects_bad_codes(codec, gold):
    codes = gold["codes"].clone()
    codes[0, 1, 2] = -1
    with pytest.raises(ValueError, match="negative"):
        codec.decode(codes)
    with pytest.raises(ValueError, match="codes must be"):
        codec.decode(gold["codes"][:, 1:])
    with pytest.raises(ValueError, match="integer"):
        codec.decode(gold["codes"].float())


def test_decode_is_causal(codec, gold):
    half = gold["codes"].shape[-1] // 2
    audio = codec.decode(gold["codes"][..., :half])
    close(audio, gold["audio_out"][..., : half * codec.frame_length], "decode of the first half", **WAVE)


def test_chunked_attention_matches(codec, gold, monkeypatch):
    monkeypatch.setattr(codec_mod.Attention, "query_chunk", 5)   # blocks of 5 queries, window keys each
    close(codec.decode(gold["codes"]), gold["audio_out"], "audio_out (chunked attention)", **WAVE)
    with torch.no_grad():
        pre = codec.quantizer.pre_module(gold["enc_downsampled"])
    close(pre, gold["enc_pre_module"], "enc_pre_module (chunked attention)", **LATENT)


def test_bfloat16_is_close(gdir, gold):
    codec = load_codec(gdir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in codec.parameters())
    audio = codec.decode(gold["codes"])
    assert audio.dtype == torch.bfloat16
    ref = gold["audio_out"]
    err = audio.float() - ref
    assert err.abs().max() < 0.25 and err.pow(2).mean() < 1e-2 * ref.pow(2).mean()
    latent = codec.encode_steps(gold["audio_in"])["latent"].float()
    assert (latent - gold["enc_latent"]).norm() < 0.1 * gold["enc_latent"].norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_float32(gdir, gold):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    codec = load_codec(gdir, device="cuda")
    assert torch.equal(codec.encode(gold["audio_in"].cuda()).cpu(), gold["codes"])
    close(codec.decode(gold["codes"]), gold["audio_out"], "audio_out (cuda)", **WAVE)


# --- codec.pth loading ----------------------------------------------------------------------------------

def stale_buffers(cfg: CodecConfig) -> dict:
    out = {}
    for name in stale_buffer_names(cfg):
        out[name] = (torch.ones(16, 16, dtype=torch.bool).tril() if name.endswith("causal_mask")
                     else torch.zeros(16, 4, 2, dtype=torch.bfloat16))
    return out


@pytest.mark.parametrize("layout", ["flat", "stale", "state_dict", "generator", "legacy_format"])
def test_codec_pth_loads(layout, tmp_path, cfg, weights, gdir, gold, codec):
    sd = dict(weights)
    if layout in ("stale", "state_dict", "generator", "legacy_format"):
        sd.update(stale_buffers(cfg))
    if layout == "generator":   # only generator.* keys survive, with the prefix stripped
        sd = {"generator." + k: v for k, v in sd.items()}
        sd["discriminator.head.weight"] = torch.zeros(3)
    path = tmp_path / "codec.pth"
    if layout in ("flat", "stale", "generator"):
        write_codec_pth(sd, path)
    elif layout == "state_dict":
        torch.save({"state_dict": sd}, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)   # not a zip: no mmap
    assert sorted(os.listdir(tmp_path)) == ["codec.pth"], "write_codec_pth left temp files"
    (tmp_path / "config.json").write_bytes((gdir / "config.json").read_bytes())
    loaded = load_codec(tmp_path)
    assert torch.equal(loaded.decode(gold["codes"]), codec.decode(gold["codes"]))
    loaded_file = load_codec(path, config=cfg)   # a file path, explicit config
    assert all(torch.equal(a, b) for a, b in zip(loaded_file.parameters(), codec.parameters()))


def _write(tmp_path, sd) -> Path:
    return write_codec_pth(sd, tmp_path / "codec.pth")


def test_codec_pth_unknown_key(tmp_path, cfg, weights):
    sd = dict(weights, **stale_buffers(cfg))
    sd["quantizer.extra.weight"] = torch.zeros(2)
    path = _write(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load_codec(path, config=cfg)
    msg = str(e.value)
    assert str(path) in msg and "1 unexpected" in msg and "quantizer.extra.weight" in msg


def test_codec_pth_missing_key(tmp_path, cfg, weights):
    sd = dict(weights)
    gone = sorted(sd)[:7]
    for k in gone:
        del sd[k]
    path = _write(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load_codec(path, config=cfg)
    msg = str(e.value)
    assert str(path) in msg and "7 missing" in msg and gone[0] in msg and "+2 more" in msg


def test_codec_pth_wrong_shape(tmp_path, cfg, weights):
    sd = dict(weights)
    name = next(iter(sd))
    sd[name] = torch.zeros(*sd[name].shape, 2)
    path = _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match="1 wrong shape: " + name.replace(".", r"\.")):
        load_codec(path, config=cfg)


def test_only_the_stale_buffers_are_dropped(tmp_path, cfg, weights):
    sd = dict(weights)
    sd["decoder.model.0.freqs_cis"] = torch.zeros(4, 2)   # right suffix, wrong place: not dropped
    with pytest.raises(CheckpointError, match="decoder.model.0.freqs_cis"):
        load_codec(_write(tmp_path, sd), config=cfg)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):   # unpickling this would create the marker file
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_is_refused(fmt, tmp_path, cfg, weights):
    marker = tmp_path / "pwned"
    path = tmp_path / "codec.pth"
    payload = {"encoder.block.0.conv.bias": _Evil(marker), **{k: weights[k] for k in list(weights)[1:3]}}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_codec(path, config=cfg)
    assert not marker.exists(), "unpickling ran code"
    assert str(path) in str(e.value) and "refused" in str(e.value)
    with pytest.raises(CheckpointError):
        read_codec_file(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path, cfg):
    path = tmp_path / "codec.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        load_codec(path, config=cfg)
    with pytest.raises(CheckpointError, match="no such"):
        load_codec(tmp_path / "missing", config=cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no codec.pth"):
        load_codec(tmp_path / "empty", config=cfg)


def test_random_init_roundtrip(tmp_path, cfg, gdir, gold):
    """A freshly built codec (seeded init, as a demo checkpoint would use) runs, and survives codec.pth."""
    model = Codec(cfg).eval()
    assert torch.equal(Codec(cfg).init_weights(seed=0).state_dict()["decoder.model.0.conv.bias"],
                       model.state_dict()["decoder.model.0.conv.bias"])
    codes = model.encode(gold["audio_in"][..., : 3 * model.frame_length])
    assert codes.shape == (1, cfg.n_codebooks, 3) and int(codes.min()) >= 0
    audio = model.decode(codes)
    assert audio.shape == (1, 1, 3 * model.frame_length) and torch.isfinite(audio).all()
    write_codec_pth(model.state_dict(), tmp_path / "codec.pth")
    loaded = load_codec(tmp_path / "codec.pth", config=cfg)
    assert torch.equal(loaded.decode(codes), audio)


@pytest.mark.parametrize("stride,cin,dilation", [(2, 4, 1), (4, 16, 1), (8, 8, 1), (8, 16, 1), (8, 32, 1), (3, 5, 2)])
def test_strided_conv_route_equals_conv1d(stride, cin, dilation):
    """The bf16 / fp16 CPU route of strided convs (windows x weight, one matmul) is F.conv1d: equal in float32,
    within bf16 rounding of float32 in bfloat16 (torch's own bf16 strided conv1d is wrong for some of these shapes
    on AMX CPUs, see codec.strided_conv_as_matmul)."""
    g = torch.Generator().manual_seed(stride * 100 + cin)
    k = 2 * stride
    w, b = torch.randn(2 * cin, cin, k, generator=g), torch.randn(2 * cin, generator=g)
    x = torch.randn(2, cin, 97 * stride + (k - 1) * dilation, generator=g)
    ref = F.conv1d(x, w, b, stride=stride, dilation=dilation)
    got = codec_mod.strided_conv_as_matmul(x, w, b, stride, dilation)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    low = codec_mod.strided_conv_as_matmul(x.bfloat16(), w.bfloat16(), b.bfloat16(), stride, dilation).float()
    assert (low - ref).norm() < 0.01 * ref.norm()
    conv = codec_mod.CausalConv1d(cin, 2 * cin, k, stride=stride, dilation=dilation, weight_norm=False)
    with torch.no_grad():
        conv.conv.weight.copy_(w)
        conv.conv.bias.copy_(b)
        y32 = conv(x)                                        # float32: F.conv1d
        y16 = conv.bfloat16()(x.bfloat16()).float()          # the module's bf16 CPU route
    assert y16.shape == y32.shape and (y16 - y32).norm() < 0.01 * y32.norm()
