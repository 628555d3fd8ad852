"""Speaker similarity with resemblyzer's pretrained GE2E voice encoder (256-d embeddings, 16 kHz input).

resemblyzer ships its weights inside the package (`resemblyzer/pretrained.pt`), so nothing is downloaded. It is
imported lazily (importing fishlab never imports resemblyzer, librosa or webrtcvad; the first call takes ~7 s),
and the VoiceEncoder is loaded once per process (module-level cache) on the CPU.

Pipeline of `speaker_embedding(audio, sr)`:
1. mono float32 ([N], [1, N] or [1, 1, N]) resampled to 16 kHz with soxr (`fishlab.audio.resample`, "HQ");
2. resemblyzer's `preprocess_wav`: volume raised to -30 dBFS if quieter (never lowered), long silences trimmed
   by webrtcvad (mode 3);
3. if the VAD trims the clip to nothing (noise, tones, the synthetic demo checkpoint's output), the untrimmed
   volume-normalised audio is embedded instead, and `info["vad_fallback"]` is True (plus a
   `SpeakerSimilarityWarning`);
4. `VoiceEncoder.embed_utterance`: mean of the L2-normalised embeddings of 1.6 s windows, L2-normalised.

Degenerate input does not raise: an empty clip, one with NaN/Inf samples, or silence (RMS below
`SILENCE_DBFS` = -90 dBFS) gets an all-NaN embedding, `info["status"]` says which, and every similarity with it
is NaN. Embeddings are non-negative (ReLU before normalisation), so cosine similarities lie in [0, 1];
unrelated voices typically score well above 0 (around 0.5-0.8), the same speaker typically above 0.8.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .audio import as_mono_numpy, resample

__all__ = ["ENCODER_SR", "EMBEDDING_DIM", "SILENCE_DBFS", "SpeakerSimilarityWarning", "load_encoder",
           "speaker_embedding", "speaker_similarity", "cosine"]

ENCODER_SR = 16000
EMBEDDING_DIM = 256
SILENCE_DBFS = -90.0
_ENCODERS: dict = {}


class SpeakerSimilarityWarning(UserWarning):
    """A clip was embedded in a degraded way (VAD fallback) or not at all (silent, empty, non-finite)."""


def _resemblyzer():
    """(VoiceEncoder, preprocess_wav, normalize_volume, audio_norm_target_dBFS), imported quietly."""
    try:
        with warnings.catch_warnings():
            # webrtcvad does `import pkg_resources` (deprecated; gone in setuptools >= 81), resemblyzer imports
            # binary_dilation from the deprecated scipy.ndimage.morphology namespace
            warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*binary_dilation", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*scipy\.ndimage\.morphology", category=DeprecationWarning)
            from resemblyzer import VoiceEncoder, preprocess_wav
            from resemblyzer.audio import normalize_volume
            from resemblyzer.hparams import audio_norm_target_dBFS, sampling_rate
    except ImportError as e:
        hint = ("webrtcvad needs pkg_resources, which setuptools >= 81 no longer provides: "
                "pip install 'setuptools<81'" if getattr(e, "name", None) == "pkg_resources"
                else "pip install 'resemblyzer>=0.1.4' 'setuptools<81' (or `pip install -e .` in the repo)")
        raise ImportError(f"speaker similarity needs resemblyzer, which could not be imported ({e}). {hint}") from e
    assert sampling_rate == ENCODER_SR, f"resemblyzer expects {sampling_rate} Hz, fishlab assumes {ENCODER_SR}"
    return VoiceEncoder, preprocess_wav, normalize_volume, audio_norm_target_dBFS


def load_encoder(device: str = "cpu"):
    """The pretrained VoiceEncoder on `device`, loaded once per process (from the weights in the package)."""
    enc = _ENCODERS.get(device)
    if enc is None:
        VoiceEncoder = _resemblyzer()[0]
        enc = VoiceEncoder(device=device, verbose=False)
        enc.eval()
        _ENCODERS[device] = enc
    return enc


def _nan_embedding() -> np.ndarray:
    return np.full(EMBEDDING_DIM, np.nan, dtype=np.float32)


def speaker_embedding(audio, sr: int, return_info: bool = False, device: str = "cpu"):
    """L2-normalised 256-d speaker embedding of mono audio at sample rate sr (float32 ndarray).

    return_info=True returns (embedding, info) with info = {"status": "ok" | "vad_fallback" | "silent" |
    "empty" | "nonfinite", "vad_fallback": bool, "input_s": seconds in, "embedded_s": seconds of 16 kHz audio
    embedded (after VAD trimming), "rms_dbfs": input level}. Statuses other than "ok" also emit a
    SpeakerSimilarityWarning; "silent", "empty" and "nonfinite" give an all-NaN embedding."""
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sample rate must be a positive int, got {sr!r}")
    a = np.asarray(as_mono_numpy(audio), dtype=np.float32)
    info = {"status": "ok", "vad_fallback": False, "input_s": a.size / sr, "embedded_s": 0.0,
            "rms_dbfs": float("-inf")}

    def degenerate(status: str, why: str):
        info["status"] = status
        warnings.warn(f"speaker_embedding: {why}; embedding is NaN", SpeakerSimilarityWarning, stacklevel=3)
        emb = _nan_embedding()
        return (emb, info) if return_info else emb

    if a.size == 0:
        return degenerate("empty", "clip has no samples")
    if not np.isfinite(a).all():
        return degenerate("nonfinite", f"{int((~np.isfinite(a)).sum())} of {a.size} samples are NaN or Inf")
    rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
    info["rms_dbfs"] = 20 * math.log10(rms) if rms > 0 else float("-inf")
    if info["rms_dbfs"] < SILENCE_DBFS:
        return degenerate("silent", f"clip is silent (rms {info['rms_dbfs']:.1f} dBFS < {SILENCE_DBFS:g})")

    _, preprocess_wav, normalize_volume, target_dbfs = _resemblyzer()
    wav = resample(np.ascontiguousarray(a), int(sr), ENCODER_SR).astype(np.float32, copy=False)
    trimmed = preprocess_wav(wav)                                 # already 16 kHz: no source_sr, no resampling
    if trimmed.size == 0:
        info["status"], info["vad_fallback"] = "vad_fallback", True
        warnings.warn(f"speaker_embedding: the VAD found no speech in the {info['input_s']:.2f} s clip; embedding "
                      f"the untrimmed, volume-normalised audio instead", SpeakerSimilarityWarning, stacklevel=2)
        trimmed = normalize_volume(wav, target_dbfs, increase_only=True)
    trimmed = np.asarray(trimmed, dtype=np.float32)
    info["embedded_s"] = trimmed.size / ENCODER_SR
    emb = np.asarray(load_encoder(device).embed_utterance(trimmed), dtype=np.float32)
    return (emb, info) if return_info else emb


def cosine(e1: np.ndarray, e2: np.ndarray) -> float:
    """Cosine similarity of two embeddings; NaN if either is NaN or zero."""
    e1 = np.asarray(e1, np.float64)
    e2 = np.asarray(e2, np.float64)
    n = float(np.linalg.norm(e1) * np.linalg.norm(e2))
    if not np.isfinite(n) or n == 0:
        return float("nan")
    return float(np.dot(e1, e2) / n)


def speaker_similarity(a, b, sr: int, sr_b: int | None = None, return_info: bool = False,
                       device: str = "cpu"):
    """Cosine similarity of the speaker embeddings of clips a and b (b at sr_b, default sr). NaN when either
    clip is silent, empty or non-finite. return_info=True returns (similarity, {"a": info_a, "b": info_b})
    with the infos of speaker_embedding (e.g. "vad_fallback")."""
    ea, ia = speaker_embedding(a, sr, return_info=True, device=device)
    eb, ib = speaker_embedding(b, sr if sr_b is None else sr_b, return_info=True, device=device)
    sim = cosine(ea, eb)
    return (sim, {"a": ia, "b": ib}) if return_info else sim
