import pytest

from fishlab.asr import normalize, wer, word_error


def test_wer_hand_worked():
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "the bat sat") == pytest.approx(1 / 3)          # one substitution
    assert wer("the cat sat", "the cat") == pytest.approx(1 / 3)              # one deletion
    assert wer("the cat sat", "the cat sat down now") == pytest.approx(2 / 3) # two insertions
    assert wer("<|speaker:0|>Good morning.", "good morning") == 0.0
    assert normalize("We're all made of STAR stuff!") == ["we're", "all", "made", "of", "star", "stuff"]


def test_without_a_local_model_wer_is_skipped_and_says_why(tmp_path):
    assert word_error(None, "hi", {}) == {"skipped": True, "reason": "no local ASR model given (parameter asr_model)"}
    with pytest.raises(FileNotFoundError, match="asr_model directory not found"):
        word_error(tmp_path / "nope", "hi", {"x": tmp_path / "x.wav"})
