"""Audio I/O and small metrics for TTS and voice cloning.

- `read_audio(path, target_sr=44100)`: any format libsndfile reads (wav, flac, ogg, ...) -> float32 [1, N] mono:
  channels are averaged (the reference's mixdown, spec s2pro-model.md §9.4), then resampled with soxr
  (quality "HQ") when the file's rate differs. The reference resamples with torchaudio's default sinc
  resampler instead; the two differ by small amounts near Nyquist, which can flip a few reference codes.
- `write_wav(path, audio, sr)`: WAV via soundfile, written atomically (temp file beside the target, fsync,
  rename). Default subtype FLOAT (32-bit IEEE float): lossless for the codec's float32 output, no
  quantisation and no clipping. `subtype="PCM_16"` writes 16-bit PCM for players that need it; samples are
  clipped to [-1, 1] first (that is the only change besides 16-bit rounding). NaN/Inf samples are refused.
- `audio_stats(audio, sr)`: duration_s, rms_dbfs, peak, clipped_fraction, finite.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import atomic_path

__all__ = ["DEFAULT_SR", "CLIP_THRESHOLD", "read_audio", "resample", "write_wav", "audio_stats"]

DEFAULT_SR = 44100
CLIP_THRESHOLD = 0.999      # |x| >= this counts as clipped (full scale within ~0.01 dB)
WAV_SUBTYPES = ("FLOAT", "PCM_16")


def resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """1-D float32 signal from sr to target_sr with soxr (high quality); unchanged when the rates match."""
    if sr == target_sr:
        return x
    import soxr
    return soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | Path, target_sr: int = DEFAULT_SR) -> Tensor:
    """Mono float32 [1, N] at target_sr from an audio file (channel mean, then soxr resampling)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)      # [N, channels]
    except (RuntimeError, sf.LibsndfileError) as e:
        raise ValueError(f"{path}: cannot read as audio ({e})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: audio file has no samples")
    mono = data.mean(axis=1, dtype=np.float32)
    mono = resample(np.ascontiguousarray(mono), int(sr), int(target_sr))
    if not np.isfinite(mono).all():
        raise ValueError(f"{path}: audio contains NaN or Inf samples")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).reshape(1, -1)


def as_mono_numpy(audio: Tensor | np.ndarray) -> np.ndarray:
    a = audio.detach().to("cpu", torch.float32).numpy() if isinstance(audio, Tensor) else np.asarray(audio, np.float32)
    if a.ndim == 3 and a.shape[:2] == (1, 1):
        a = a[0, 0]
    elif a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim != 1:
        raise ValueError(f"audio must be mono: [N], [1, N] or [1, 1, N], got shape {tuple(a.shape)}")
    return a


def write_wav(path: str | Path, audio: Tensor | np.ndarray, sr: int, subtype: str = "FLOAT") -> Path:
    """Write mono audio ([N], [1, N] or [1, 1, N]) as a WAV file, atomically. subtype "FLOAT" (default,
    lossless 32-bit float) or "PCM_16" (clipped to [-1, 1], 16-bit). Refuses NaN/Inf samples."""
    import soundfile as sf

    if subtype not in WAV_SUBTYPES:
        raise ValueError(f"subtype must be one of {WAV_SUBTYPES}, got {subtype!r}")
    if not isinstance(sr, int) or sr <= 0:
        raise ValueError(f"sample rate must be a positive int, got {sr!r}")
    a = as_mono_numpy(audio)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"refusing to write {path}: {int(bad.sum())} of {a.size} samples are NaN or Inf "
                         f"(first at sample {int(np.argmax(bad))})")
    if subtype == "PCM_16":
        a = np.clip(a, -1.0, 1.0)
    path = Path(path)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), a, sr, subtype=subtype, format="WAV")
    return path


def audio_stats(audio: Tensor | np.ndarray, sr: int) -> dict:
    """duration_s, rms_dbfs (20 log10 rms; -inf for silence or no samples), peak (max |x|), clipped_fraction
    (share of samples with |x| >= CLIP_THRESHOLD), finite (no NaN/Inf). Level figures use finite samples only."""
    a = as_mono_numpy(audio).astype(np.float64)
    finite = np.isfinite(a)
    f = a[finite]
    rms = float(np.sqrt(np.mean(f * f))) if f.size else 0.0
    return {
        "duration_s": a.size / sr,
        "rms_dbfs": 20 * math.log10(rms) if rms > 0 else float("-inf"),
        "peak": float(np.abs(f).max()) if f.size else 0.0,
        "clipped_fraction": float(np.mean(np.abs(f) >= CLIP_THRESHOLD)) if f.size else 0.0,
        "finite": bool(finite.all()),
    }
