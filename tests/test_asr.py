"""Word error rate with the local recognizer: jiwer's rates on normalised text, and pocketsphinx on real speech
(eSpeak NG reading Harvard sentences, made in the test) far below its rate on noise."""
import numpy as np
import pytest
import soxr

from fishlab.asr import error_rates, normalize, transcribe, wer, word_error
from fishlab.audio import write_wav
from fishlab.textdata import harvard_sentences

from speech import speak


def test_wer_hand_worked():
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "the bat sat") == pytest.approx(1 / 3)          # one substitution
    assert wer("the cat sat", "the cat") == pytest.approx(1 / 3)              # one deletion
    assert wer("the cat sat", "the cat sat down now") == pytest.approx(2 / 3) # two insertions
    assert wer("<|speaker:0|>Good morning.", "good morning") == 0.0
    assert normalize("We're all made of STAR stuff!") == ["we're", "all", "made", "of", "star", "stuff"]
    r = error_rates(["the cat sat", "a dog"], ["the bat sat", "a dog ran"])
    assert r["wer"] == pytest.approx(2 / 5) and r["substitutions"] == 1 and r["insertions"] == 1
    assert r["cer"] == pytest.approx(5 / 16)      # 'c'->'b', then ' ran' inserted: 1 + 4 of 11 + 5 chars
    with pytest.raises(ValueError, match="empty"):
        error_rates([" ... "], ["x"])


def test_real_speech_is_recognised_far_better_than_noise(tmp_path):
    sentences = harvard_sentences(6)
    clips, hyps = {}, []
    for i, s in enumerate(sentences):
        a, sr = speak(s)
        a = soxr.resample(a, sr, 44100)                    # TTS samples are 44.1 kHz: the same path
        p = tmp_path / f"s{i}.wav"
        write_wav(p, a[None], 44100)
        r = word_error(None, s, {"x": p})
        assert r["recognizer"] == "pocketsphinx" and not r["skipped"]
        hyps.append(r["clips"]["x"]["transcript"])
    speech = error_rates(sentences, hyps)
    rng = np.random.default_rng(0)
    noise = error_rates(sentences[:3], [transcribe(0.3 * rng.standard_normal(2 * 44100), 44100) for _ in range(3)])
    assert speech["wer"] < 0.85 and speech["cer"] < 0.6, (speech, hyps)     # measured 0.6-0.75 (eSpeak + sphinx)
    assert noise["wer"] >= 0.95, noise
    assert transcribe(a, 44100) == transcribe(a, 44100)                      # a clip's transcript is reproducible


def test_an_asr_model_dir_must_exist_and_be_a_ctranslate2_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="asr_model directory not found"):
        word_error(tmp_path / "nope", "hi", {"x": tmp_path / "x.wav"})
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        transcribe(np.zeros(16000, np.float32), 16000, tmp_path)
