"""`synthesize` end to end on the demo checkpoint (synthetic weights: the audio is noise, the mechanics are real)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from fishlab import spec
from fishlab.audio import audio_stats, read_audio, write_wav
from fishlab.demo import build_demo_checkpoint
from fishlab.model.codec_load import load_codec
from fishlab.model.load import load_transformer
from fishlab.tokenizer import load_tokenizer
from fishlab.tts import encode_reference, prompt_limit, synthesize


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    return load_transformer(d), load_codec(d), load_tokenizer(d)


def check_audio(audio, codes, info, codec):
    assert audio.dtype == torch.float32 and audio.dim() == 2 and audio.shape[0] == 1
    assert audio.shape[1] == codes.shape[1] * codec.frame_length == info["samples"]
    assert info["sample_rate"] == codec.sample_rate == 44100
    assert bool(torch.isfinite(audio).all())
    assert codes.shape[0] == codec.n_codebooks and codes.dtype == torch.long and (codes >= 0).all()
    assert info["frames"] == codes.shape[1] == sum(b["codes"] for b in info["batches"])
    assert math.isclose(info["seconds"], audio.shape[1] / 44100)
    for b in info["batches"]:
        assert b["codes"] == b["frames_generated"] - 1                 # the last frame is dropped
        assert b["stop"] in ("eos", "length")
    assert audio_stats(audio, 44100)["finite"]


def test_plain_tts(stack):
    model, codec, tok = stack
    audio, codes, info = synthesize(model, codec, tok, "Hello there.", seed=0, max_new_tokens=12)
    check_audio(audio, codes, info, codec)
    assert info["mode"] == "tts" and info["n_batches"] == 1 and info["reference_frames"] == 0
    b = info["batches"][0]
    assert b["text"] == "Hello there."
    assert b["frames_generated"] <= 12 and (b["stop"] == "eos" or b["frames_generated"] == 12)
    assert info["sampling"]["temperature_used"] == 0.80078125 and info["sampling"]["top_k"] == 30
    assert info["warnings"] == []


def test_seeded_synthesis_is_reproducible(stack):
    model, codec, tok = stack
    a1, c1, _ = synthesize(model, codec, tok, "Good morning!", seed=5, max_new_tokens=4)
    a2, c2, _ = synthesize(model, codec, tok, "Good morning!", seed=5, max_new_tokens=4)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)


def test_voice_cloning_from_wav(stack, tmp_path):
    model, codec, tok = stack
    sr = 22050
    t = np.arange(int(0.2 * sr)) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1).astype(np.float32)
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), stereo, sr, subtype="FLOAT")
    n44 = read_audio(ref, 44100).shape[1]
    ref_codes = encode_reference(codec, ref)
    assert ref_codes.shape == (codec.n_codebooks, math.ceil(n44 / codec.frame_length))

    audio, codes, info = synthesize(model, codec, tok, "Good morning!", reference=ref,
                                    reference_text="Hello there, this is me.", seed=1, max_new_tokens=5)
    check_audio(audio, codes, info, codec)
    assert info["mode"] == "clone" and info["reference_frames"] == ref_codes.shape[1]
    _, _, plain = synthesize(model, codec, tok, "Good morning!", seed=1, max_new_tokens=2)
    n = lambda s: len(tok.encode(s))                                       # noqa: E731
    extra = (n(spec.SYSTEM_CLONE) - n(spec.SYSTEM_TTS) + n("<|speaker:0|>Hello there, this is me.")
             + n(spec.CLONE_SPEECH_HEADER) + ref_codes.shape[1])
    assert info["batches"][0]["prompt_columns"] == plain["batches"][0]["prompt_columns"] + extra

    # a [1, N] tensor at the codec rate is the same reference
    same = encode_reference(codec, read_audio(ref, 44100))
    assert torch.equal(same, ref_codes)
    out = tmp_path / "out.wav"
    write_wav(out, audio, info["sample_rate"])
    assert sf.info(str(out)).frames == audio.shape[1]


def test_multi_speaker_batches_use_iterative_prompting(stack):
    model, codec, tok = stack
    text = "<|speaker:0|>Hello there. <|speaker:1|>Good morning!"
    audio, codes, info = synthesize(model, codec, tok, text, seed=2, max_new_tokens=4, chunk_length=20)
    check_audio(audio, codes, info, codec)
    b0, b1 = info["batches"]
    assert (b0["text"], b1["text"]) == ("<|speaker:0|>Hello there.", "<|speaker:1|>Good morning!")
    # batch 1's prompt = system + user(batch 0) + assistant(codes of batch 0) + user(batch 1) + prefix
    added = (len(tok.encode("<|im_start|>user\n")) + len(tok.encode(b0["text"])) + 2 * len(tok.encode("<|im_end|>\n"))
             + len(tok.encode("<|im_start|>assistant\n<|voice|>")) + b0["codes"])
    n0, n1 = len(tok.encode(b0["text"])), len(tok.encode(b1["text"]))
    assert b1["prompt_columns"] == b0["prompt_columns"] - n0 + n1 + added
    assert codes.shape[1] == b0["codes"] + b1["codes"]


def test_reference_without_text_falls_back_with_warning(stack):
    model, codec, tok = stack
    with pytest.warns(UserWarning, match="without reference_text"):
        audio, codes, info = synthesize(model, codec, tok, "Hi.", reference=torch.zeros(1, 4096), max_new_tokens=2)
    assert info["mode"] == "tts" and info["warnings"] and info["reference_frames"] == 0


def test_errors_and_empty_output(stack):
    model, codec, tok = stack
    with pytest.raises(ValueError, match="without reference audio"):
        synthesize(model, codec, tok, "Hi.", reference_text="hello")
    with pytest.raises(ValueError, match="empty"):
        synthesize(model, codec, tok, "   ")
    with pytest.raises(ValueError, match="temperature"):
        synthesize(model, codec, tok, "Hi.", temperature=2.0)
    with pytest.raises(ValueError, match="mono"):
        synthesize(model, codec, tok, "Hi.", reference=torch.zeros(2, 100), reference_text="x")
    audio, codes, info = synthesize(model, codec, tok, "Hi.", max_new_tokens=1)
    assert audio.shape == (1, 0) and codes.shape == (codec.n_codebooks, 0) and info["warnings"]


def test_prompt_limit():
    assert prompt_limit(32768) == 30720
    assert prompt_limit(4096) == 2048
