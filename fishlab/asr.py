"""Word error rate of generated speech, only when the user points params at a local ASR model.

fishlab ships no ASR model and downloads nothing. `transcribe` runs a local Hugging Face speech-recognition
model directory (e.g. a Whisper checkpoint on disk) through `transformers`, which is then needed as an extra
install; `wer` is plain word-level edit distance.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation or speaker tags."""
    text = re.sub(r"<\|[^|]*\|>", " ", text.lower())
    return re.findall(r"[\w']+", text)


def wer(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on normalized words."""
    r, h = normalize(reference), normalize(hypothesis)
    if not r:
        return 0.0 if not h else float("inf")
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
            prev, d[j] = d[j], cur
    return d[len(h)] / len(r)


def transcribe(model_dir: str | Path, audio, sr: int) -> str:
    """Text of `audio` [1, N] by the local ASR model in model_dir (no network: local_files_only)."""
    p = Path(model_dir).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"asr_model directory not found: {p}")
    try:
        from transformers import pipeline
    except ImportError:
        raise ImportError("asr_model is set but the 'transformers' package is not installed; "
                          "pip install transformers (fishlab does not depend on it)") from None
    asr = pipeline("automatic-speech-recognition", model=str(p), model_kwargs={"local_files_only": True})
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    return asr({"raw": x, "sampling_rate": sr})["text"]


def word_error(model_dir: str | Path | None, text: str, clips: dict[str, str | Path], sr: int = 44100) -> dict:
    """{"skipped": True, "reason": ...} without a model; else per-clip transcript and WER against `text`."""
    if not model_dir:
        return {"skipped": True, "reason": "no local ASR model given (parameter asr_model)"}
    if not Path(model_dir).expanduser().is_dir():
        raise FileNotFoundError(f"asr_model directory not found: {Path(model_dir).expanduser()}")
    from .audio import read_audio
    out = {"skipped": False, "model": str(model_dir), "clips": {}}
    for name, path in clips.items():
        hyp = transcribe(model_dir, read_audio(path, sr), sr)
        out["clips"][name] = {"transcript": hyp, "wer": wer(text, hyp)}
    return out
