import soundfile as sf

from fishlab.cli import main
from fishlab.demo import build_demo_checkpoint


def test_tts_verb_quantizes_then_speaks_and_clones(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("FISHLAB_CACHE", str(tmp_path / "cache"))
    ckpt = build_demo_checkpoint(tmp_path / "demo")
    out = tmp_path / "a.wav"
    assert main(["tts", "--checkpoint", str(ckpt), "--phase", "1b", "--text", "Good morning.", "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    audio, sr = sf.read(out)
    assert sr == 44100 and len(audio) > 0 and len(audio) % 2048 == 0
    assert "phase-1b" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "quantized").glob("*/phase-1b/quantization.json"))
    clone = tmp_path / "b.wav"
    assert main(["tts", "--checkpoint", str(ckpt), "--text", "Hello.", "--reference", str(out),
                 "--reference-text", "Good morning.", "--out", str(clone), "--max-new-tokens", "8"]) == 0
    assert "(clone, demo)" in capsys.readouterr().out


def test_tts_verb_user_errors(tmp_path, capsys):
    assert main(["tts", "--checkpoint", str(tmp_path / "nope"), "--text", "x", "--out", str(tmp_path / "o.wav")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ckpt = build_demo_checkpoint(tmp_path / "demo")
    assert main(["tts", "--checkpoint", str(ckpt), "--text", "x", "--reference", "r.wav",
                 "--out", str(tmp_path / "o.wav")]) == 2
    assert "needs both --reference WAV and --reference-text" in capsys.readouterr().err
    assert main(["tts", "--checkpoint", str(ckpt), "--text", "x", "--phase", "9z", "--out", str(tmp_path / "o.wav")]) == 2
    assert "unknown phase '9z'" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()
