"""Word and character error rate of generated speech, with a local speech recognizer that ships its weights.

Nothing is downloaded. Two recognizers:
- **pocketsphinx** (the default, always installed): CMU PocketSphinx 5 with the US-English acoustic model,
  language model and dictionary its PyPI wheel carries (BSD). Audio is resampled to 16 kHz mono 16-bit. The
  decoder's feature state (noise tracking, live cepstral mean) is reset before every clip, so a clip's
  transcript is what a new decoder gives, whatever was decoded before it.
- a local **faster-whisper / CTranslate2** model directory (`asr_model=DIR`, a folder with `model.bin`): a much
  better recognizer; needs the optional `faster-whisper` package (fishlab does not depend on it).

WER and CER come from jiwer (the standard implementation), on normalised text: lower case, speaker tags like
`<|speaker:0|>` removed, punctuation other than apostrophes removed, whitespace collapsed.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

ASR_RATE = 16000
POCKETSPHINX = "pocketsphinx"


def normalize_text(text: str) -> str:
    """Lower-case words separated by single spaces, without punctuation (apostrophes kept) or speaker tags."""
    text = re.sub(r"<\|[^|]*\|>", " ", text.lower())
    return " ".join(re.findall(r"[\w']+", text))


def normalize(text: str) -> list[str]:
    """normalize_text as a list of words."""
    return normalize_text(text).split()


def error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """jiwer's corpus-level WER and CER over normalised texts (an empty reference counts as a word/character
    error for every hypothesis word/character)."""
    import jiwer
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("every reference text is empty after normalisation")
    words = jiwer.process_words(refs, hyps)
    return {"wer": words.wer, "cer": jiwer.cer(refs, hyps), "substitutions": words.substitutions,
            "deletions": words.deletions, "insertions": words.insertions,
            "reference_words": sum(len(r.split()) for r in refs)}


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of one hypothesis (jiwer, normalised text)."""
    return error_rates([reference], [hypothesis])["wer"]


def _mono16k(audio, sr: int) -> np.ndarray:
    import soxr
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim > 1:
        x = x.reshape(-1, x.shape[-1]).mean(0) if x.shape[0] <= 2 else x.mean(-1)
    x = np.nan_to_num(x.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    return soxr.resample(x, sr, ASR_RATE).astype(np.float32) if sr != ASR_RATE else x


@lru_cache(maxsize=1)
def _sphinx():
    from pocketsphinx import Decoder
    d = Decoder(samprate=ASR_RATE, loglevel="FATAL")
    return d, d.get_cmn()


@lru_cache(maxsize=2)
def _whisper(model_dir: str):
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise ImportError(f"asr_model {model_dir} is a CTranslate2 (faster-whisper) model, but the optional "
                          "'faster-whisper' package is not installed: pip install faster-whisper") from None
    return WhisperModel(model_dir, device="cpu", compute_type="int8")


def recognizer_name(model_dir: str | Path | None) -> str:
    return POCKETSPHINX if not model_dir else f"faster-whisper {Path(model_dir).expanduser().name}"


def transcribe(audio, sr: int, model_dir: str | Path | None = None) -> str:
    """The text of `audio` (any shape holding one mono clip, float in [-1, 1]) at rate `sr`: pocketsphinx, or the
    faster-whisper model in model_dir."""
    x = _mono16k(audio, sr)
    if model_dir:
        p = Path(model_dir).expanduser()
        if not (p / "model.bin").is_file():
            raise FileNotFoundError(f"asr_model {p}: not a CTranslate2 / faster-whisper model directory "
                                    "(no model.bin)")
        segments, _ = _whisper(str(p)).transcribe(x, language="en", beam_size=5)
        return " ".join(s.text.strip() for s in segments).strip()
    d, cmn0 = _sphinx()
    d.reinit_feat()             # fresh feature state (noise tracking) and cepstral mean: as a new decoder
    d.set_cmn(cmn0)
    pcm = (np.clip(x, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    d.start_utt()
    d.process_raw(pcm, False, True)
    d.end_utt()
    hyp = d.hyp()
    return hyp.hypstr if hyp is not None else ""


def word_error(model_dir: str | Path | None, text: str, clips: dict[str, str | Path], sr: int = 44100) -> dict:
    """Transcript, WER and CER against `text` of each clip (a wav path), by the recognizer `model_dir` selects
    (None: pocketsphinx)."""
    if model_dir and not Path(model_dir).expanduser().is_dir():
        raise FileNotFoundError(f"asr_model directory not found: {Path(model_dir).expanduser()}")
    from .audio import read_audio
    out = {"skipped": False, "recognizer": recognizer_name(model_dir), "text": text, "clips": {}}
    for name, path in clips.items():
        hyp = transcribe(read_audio(path, sr), sr, model_dir)
        out["clips"][name] = {"transcript": hyp, **error_rates([text], [hyp])}
    return out
