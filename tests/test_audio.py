"""Audio I/O (fishlab.audio): read with mixdown + soxr resampling, atomic WAV writes, NaN refusal, stats."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from fishlab.audio import audio_stats, read_audio, write_wav


def tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_float_round_trip_is_lossless(tmp_path):
    x = torch.from_numpy(tone(44100, 0.25))[None]
    x[0, 10] = 1.5                                        # out of range: FLOAT keeps it
    p = write_wav(tmp_path / "a.wav", x, 44100)
    info = sf.info(str(p))
    assert info.subtype == "FLOAT" and info.samplerate == 44100 and info.channels == 1
    y = read_audio(p, 44100)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(x, y)


def test_pcm16_round_trip(tmp_path):
    x = torch.from_numpy(tone(44100, 0.1))[None]
    x[0, 0] = 2.0
    p = write_wav(tmp_path / "a.wav", x, 44100, subtype="PCM_16")
    assert sf.info(str(p)).subtype == "PCM_16"
    y = read_audio(p)
    assert abs(float(y[0, 0]) - 1.0) < 1e-4                      # clipped to full scale
    assert torch.allclose(x[:, 1:], y[:, 1:], atol=1 / 32768 + 1e-6)


@pytest.mark.parametrize("sr", [22050, 48000])
def test_stereo_mixdown_and_resampling(tmp_path, sr):
    left, right = tone(sr, 0.5, 440, 0.6), tone(sr, 0.5, 440, 0.2)
    p = tmp_path / f"s{sr}.wav"
    sf.write(str(p), np.stack([left, right], axis=1), sr, subtype="FLOAT")
    y = read_audio(p, 44100)
    assert y.shape == (1, round(0.5 * 44100)) and y.dtype == torch.float32
    ref = tone(44100, 0.5, 440, 0.4)                             # channel mean: amplitude (0.6 + 0.2) / 2
    mid = slice(2000, -2000)                                     # away from the resampler's edge transients
    assert np.abs(y[0].numpy()[mid] - ref[mid]).max() < 2e-3
    same = read_audio(p, sr)                                     # no resampling when rates match
    assert torch.allclose(same[0], torch.from_numpy((left + right) / 2), atol=1e-7)


def test_write_refuses_nan_and_inf(tmp_path):
    x = torch.zeros(1, 100)
    x[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_wav(tmp_path / "bad.wav", x, 44100)
    x[0, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_wav(tmp_path / "bad.wav", x, 44100)
    assert list(tmp_path.iterdir()) == []                        # nothing left behind, not even a temp file


def test_write_is_atomic_over_existing_file(tmp_path):
    p = tmp_path / "a.wav"
    write_wav(p, torch.zeros(1, 10), 44100)
    with pytest.raises(ValueError):
        write_wav(p, torch.full((1, 10), float("nan")), 44100)
    assert sf.info(str(p)).frames == 10                          # the old file is intact
    write_wav(p, torch.ones(1, 1, 20) * 0.1, 16000)               # [1, 1, N] accepted
    assert sf.info(str(p)).frames == 20 and sorted(x.name for x in tmp_path.iterdir()) == ["a.wav"]


def test_write_rejects_bad_shapes_and_args(tmp_path):
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "a.wav", torch.zeros(2, 10), 44100)
    with pytest.raises(ValueError, match="subtype"):
        write_wav(tmp_path / "a.wav", torch.zeros(1, 10), 44100, subtype="PCM_24")
    with pytest.raises(ValueError, match="sample rate"):
        write_wav(tmp_path / "a.wav", torch.zeros(1, 10), 0)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_audio(tmp_path / "junk.wav")


def test_audio_stats():
    sr = 44100
    x = torch.from_numpy(tone(sr, 1.0, amp=0.5))[None]
    s = audio_stats(x, sr)
    assert s["duration_s"] == 1.0 and s["finite"] is True and s["clipped_fraction"] == 0.0
    assert abs(s["peak"] - 0.5) < 1e-3
    assert abs(s["rms_dbfs"] - 20 * math.log10(0.5 / math.sqrt(2))) < 0.01      # ~ -9.03 dBFS
    y = x.clone()
    y[0, :441] = 1.0
    y[0, 441] = float("nan")
    s = audio_stats(y, sr)
    assert s["finite"] is False and s["peak"] == 1.0
    assert abs(s["clipped_fraction"] - 441 / (sr - 1)) < 1e-9
    assert audio_stats(torch.zeros(1, 10), sr)["rms_dbfs"] == float("-inf")
