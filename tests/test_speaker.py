"""Speaker similarity (fishlab.speaker) with resemblyzer's packaged encoder, on synthetic "voices": harmonic
tones with a gliding f0, syllable-rate envelope and three formant peaks."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from fishlab import speaker as sp

SR = 44100


def voice(sr: int, f0: float, formants, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t) + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = np.zeros(n)
    for k in range(1, int(sr / 2 / (f0 * 1.1))):
        amp = sum(np.exp(-0.5 * ((k * f0 - fc) / bw) ** 2) for fc, bw in formants) + 0.02 / k
        x += amp * np.sin(k * phase)
    x *= np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5          # ~5 syllables per second
    x += 0.003 * rng.standard_normal(n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


LOW = dict(f0=110, formants=[(700, 130), (1200, 150), (2600, 200)])
LOW_2 = dict(f0=115, formants=[(650, 130), (1150, 150), (2500, 200)])
HIGH = dict(f0=240, formants=[(300, 80), (2300, 150), (3000, 200)])


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def clips():
    return {"low": voice(SR, **LOW), "low2": voice(SR, **LOW_2, seed=1), "high": voice(SR, **HIGH)}


def test_import_is_lazy():
    code = "import fishlab, fishlab.speaker, sys; print('resemblyzer' in sys.modules, 'librosa' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_embedding_shape_norm_and_cached_encoder(clips):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e, info = sp.speaker_embedding(clips["low"], SR, return_info=True)
    leaked = [str(w.message) for w in caught if "pkg_resources" in str(w.message) or "morphology" in str(w.message)]
    assert not leaked, leaked                                         # import-time warnings are suppressed
    assert e.shape == (256,) and e.dtype == np.float32
    assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5) and (e >= 0).all()
    assert info["status"] == "ok" and not info["vad_fallback"] and info["embedded_s"] > 1.0
    assert sp.load_encoder() is sp.load_encoder()                     # loaded once per process


def test_similarity_self_and_other_voices(clips):
    same = sp.speaker_similarity(clips["low"], clips["low"], SR)
    close = sp.speaker_similarity(clips["low"], clips["low2"], SR)
    far = sp.speaker_similarity(clips["low"], clips["high"], SR)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert far < close < same
    assert far < 0.9


def test_sample_rates_agree(clips):
    """The same voice synthesised at 44.1 kHz and at 16 kHz (each resampled/not as needed) embeds alike."""
    native_16k = voice(sp.ENCODER_SR, **LOW)
    sim = sp.speaker_similarity(clips["low"], native_16k, SR, sr_b=sp.ENCODER_SR)
    assert sim > 0.98
    at_48k = voice(48000, **LOW)
    assert sp.speaker_similarity(clips["low"], at_48k, SR, sr_b=48000) > 0.98


def test_silent_and_broken_clips_give_nan_with_flag(clips):
    with pytest.warns(sp.SpeakerSimilarityWarning, match="silent"):
        sim, info = sp.speaker_similarity(np.zeros(SR, np.float32), clips["low"], SR, return_info=True)
    assert np.isnan(sim) and info["a"]["status"] == "silent" and info["b"]["status"] == "ok"
    with pytest.warns(sp.SpeakerSimilarityWarning):
        e, info = sp.speaker_embedding(np.array([], np.float32), SR, return_info=True)
    assert info["status"] == "empty" and np.isnan(e).all() and e.shape == (256,)
    bad = clips["low"].copy()
    bad[100] = np.nan
    with pytest.warns(sp.SpeakerSimilarityWarning, match="NaN"):
        assert np.isnan(sp.speaker_similarity(bad, clips["low"], SR))


def test_vad_fallback_on_clip_without_speech():
    """A clip the VAD trims to nothing (here: 20 ms of tone) is embedded untrimmed, and says so."""
    short = voice(SR, **LOW)[: SR // 50]
    with pytest.warns(sp.SpeakerSimilarityWarning, match="VAD"):
        e, info = sp.speaker_embedding(short, SR, return_info=True)
    assert info["status"] == "vad_fallback" and info["vad_fallback"]
    assert np.isfinite(e).all() and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)


def test_missing_resemblyzer_error_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "resemblyzer" or name.startswith("resemblyzer."):
            raise ModuleNotFoundError("No module named 'resemblyzer'", name="resemblyzer")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install 'resemblyzer"):
        sp._resemblyzer()
