"""Audio in reports (fishlab.report.audio): lossless, un-normalised data-URI players, spectrograms on one
fixed dB scale, static listening grids (blind mode with a collapsed key), the opt-in explorer."""
from __future__ import annotations

import base64
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from fishlab.report import audio as ra  # noqa: E402
from fishlab.report.tables import HTML  # noqa: E402

SR = 44100


def tone(seconds=0.25, freq=440.0, amp=0.5, sr=SR):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode_players(h: str) -> list[tuple[np.ndarray, int, str]]:
    out = []
    for b64 in re.findall(r'<audio[^>]*src="data:audio/wav;base64,([A-Za-z0-9+/=]+)"', h):
        data, sr = sf.read(io.BytesIO(base64.b64decode(b64)), dtype="float32")
        out.append((data, sr, sf.info(io.BytesIO(base64.b64decode(b64))).subtype))
    return out


def test_player_round_trip_same_samples_and_rate():
    rng = np.random.default_rng(0)
    x = (0.8 * rng.uniform(-1, 1, 4410)).astype(np.float32)
    h = ra.audio_player(torch.from_numpy(x)[None], 22050, label="noise <b>")
    assert isinstance(h, HTML) and h._repr_html_() == str(h)
    assert h.count("<audio") == 1 and "controls" in h and "<script" not in h
    assert "noise &lt;b&gt;" in h                                  # label escaped
    [(y, sr, subtype)] = decode_players(h)
    assert sr == 22050 and subtype == "PCM_24" and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= 2.0 ** -23 + 1e-9               # 24-bit: within one LSB
    [(y, _, subtype)] = decode_players(ra.audio_player(x, 22050, subtype="FLOAT"))
    assert subtype == "FLOAT" and np.array_equal(x, y)               # float: bit-exact


def test_player_not_normalised_and_clipping_reported():
    x = tone(amp=0.1)
    h = ra.audio_player(x, SR)
    [(y, _, _)] = decode_players(h)
    assert abs(np.abs(y).max() - 0.1) < 1e-3                         # a quiet clip stays quiet
    assert "clipped" not in h and "⚠" not in h

    x2 = tone(amp=0.5)
    x2[[3, 7]] = [1.7, -2.0]
    x2[9] = np.nan
    h2 = ra.audio_player(x2, SR, label="loud")
    [(y2, _, _)] = decode_players(h2)
    assert y2[3] == pytest.approx(1.0, abs=1e-6) and y2[7] == -1.0 and y2[9] == 0.0
    assert np.allclose(np.delete(y2, [3, 7, 9]), np.delete(x2, [3, 7, 9]), atol=2.0 ** -23)
    assert "clipped: 2 samples" in h2 and "1 NaN/Inf sample " in h2
    assert "peak 2.000" in h2                                        # stats are of the samples before clipping


def test_spectrogram_db_scale_full_scale_sine_is_0db():
    f = 20 * SR / 2048                                               # on a bin centre: no scalloping loss
    db, dur = ra.spectrogram_db(tone(1.0, f, 1.0), SR)
    assert db.shape[0] == 1025 and dur == pytest.approx(1.0)
    assert db[:, 4:-4].max() == pytest.approx(0.0, abs=0.05)
    db_half, _ = ra.spectrogram_db(tone(1.0, f, 0.5), SR)
    assert db_half[:, 4:-4].max() == pytest.approx(-6.02, abs=0.05)


def test_spectrogram_figure_shares_one_colour_scale():
    rng = np.random.default_rng(1)
    clips = {"base": tone(0.5), "quiet": tone(0.3, amp=0.01),
             "noise": (0.05 * rng.standard_normal(8000)).astype(np.float32), "short": tone(0.01)}
    fig = ra.spectrogram_figure(clips, SR, vmin_db=-90, vmax_db=-10)
    try:
        images = [im for ax in fig.axes for im in ax.images]
        assert len(images) == 4
        assert {im.get_clim() for im in images} == {(-90, -10)}
        norms = {(im.norm.vmin, im.norm.vmax) for im in images}
        assert norms == {(-90, -10)}
        axes = [im.axes for im in images]
        assert all(ax.get_xlim() == axes[0].get_xlim() and ax.get_ylim() == axes[0].get_ylim() for ax in axes)
        assert axes[0].get_xlim()[1] >= 0.5                          # the longest clip sets the time axis
        assert [ax.get_title() for ax in axes] == list(clips)
    finally:
        plt.close(fig)
    with pytest.raises(ValueError):
        ra.spectrogram_figure({}, SR)


def test_spectrogram_image_is_png_data_uri():
    open_figures = plt.get_fignums()
    h = ra.spectrogram_image(tone(), SR, size=(3, 1.4), dpi=80)
    assert plt.get_fignums() == open_figures                        # no pyplot figure (nothing shown twice)
    m = re.fullmatch(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="240" height="112".*>', h)
    assert m, h[:120]
    png = base64.b64decode(m.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def grid_rows():
    rng = np.random.default_rng(2)
    return {
        "utt one": {"base": tone(0.2), "2a": tone(0.2, amp=0.3),
                    "3b": (0.1 * rng.standard_normal(5000)).astype(np.float32)},
        "utt two": {"base": tone(0.3, 220), "2a": tone(0.3, 220, 0.2), "3b": tone(0.1, 220, 0.05)},
    }


def headers(h: str, table: int = 0) -> list[str]:
    thead = re.findall(r"<thead>(.*?)</thead>", h)[table]
    return re.findall(r"<th[^>]*>(.*?)</th>", thead)


def test_grid_one_player_per_cell_no_script():
    rows = grid_rows()
    h = ra.listening_grid(rows, SR, phase_order=["base", "2a", "3b"], caption="Listening")
    assert isinstance(h, HTML)
    assert h.count("<audio") == 6 and h.count("data:image/png;base64,") == 6
    assert "<script" not in h.lower() and "<details" not in h
    assert headers(h) == ["utterance", "base", "2a", "3b"]
    assert h.count("dBFS") == 6
    # cells are in phase order: the second cell of row one is the 0.3-amplitude tone
    players = decode_players(h)
    assert abs(np.abs(players[1][0]).max() - 0.3) < 1e-3
    # a missing clip is a dash, not a crash; phases not in phase_order are appended
    rows["utt two"].pop("3b")
    rows["utt two"]["extra"] = tone(0.1)
    h2 = ra.listening_grid(rows, SR, phase_order=["base", "2a"], spectrograms=False)
    assert headers(h2) == ["utterance", "base", "2a", "3b", "extra"]
    assert h2.count("<audio") == 6 and h2.count(">–</td>") == 2 and "data:image/png" not in h2


def test_grid_blind_hides_labels_and_keys_them():
    rows = grid_rows()
    order = ["base", "2a", "3b"]
    h = ra.listening_grid(rows, SR, phase_order=order, blind=True, seed=3)
    assert h.count("<audio") == 6 and "<script" not in h.lower()
    assert headers(h) == ["utterance", "A", "B", "C"]
    assert "dBFS" not in h                                           # no level captions in blind mode
    before_key, key = h.split("<details", 1)
    for p in order:
        assert f">{p}<" not in before_key                            # phase names only in the key
    assert "<summary>Key</summary>" in key and "</details>" in key
    key_rows = re.findall(r"<tr><td[^>]*>(.*?)</td>(.*?)</tr>", key.split("<tbody>")[1])
    assert [u for u, _ in key_rows] == ["utt one", "utt two"]
    # the key maps letters to the clips really played: decode each row and check against the key
    players = decode_players(before_key)
    for r, (utt, cells) in enumerate(key_rows):
        names = re.findall(r"<td[^>]*>(.*?)</td>", cells)
        assert sorted(names) == sorted(order)
        for c, name in enumerate(names):
            y = players[3 * r + c][0]
            x = rows[utt][name]
            assert y.shape == x.shape and np.allclose(y, x, atol=2.0 ** -23)
    # reproducible with the seed, different with another seed (for at least one of several seeds)
    assert ra.listening_grid(rows, SR, order, blind=True, seed=3) == h
    assert any(ra.listening_grid(rows, SR, order, blind=True, seed=s, spectrograms=False).split("<details")[1]
               != ra.listening_grid(rows, SR, order, blind=True, seed=3, spectrograms=False).split("<details")[1]
               for s in range(4, 10))


def test_grid_blind_with_open_reference():
    h = ra.listening_grid(grid_rows(), SR, ["base", "2a", "3b"], blind=True, reference=True, spectrograms=False)
    assert headers(h) == ["utterance", "reference (base)", "A", "B", "C"]
    assert h.count("<audio") == 8


def test_explorer_renders_nothing_unless_enabled():
    rows = grid_rows()
    assert ra.explorer(rows, SR, ["base", "2a", "3b"]) is None
    assert ra.explorer(rows, SR, ["base", "2a", "3b"], enabled=False) is None
    ipywidgets = pytest.importorskip("ipywidgets")
    w = ra.explorer(rows, SR, ["base", "2a", "3b"], enabled=True)
    assert isinstance(w, ipywidgets.VBox)
    plt.close("all")


def test_average_spectrum_peak_at_tone():
    f, db = ra.average_spectrum_db(tone(0.5, 1000.0), SR)
    assert f[np.argmax(db)] == pytest.approx(1000.0, abs=SR / 2048)


def test_synthetic_audio_note():
    h = ra.synthetic_audio_note()
    assert isinstance(h, HTML) and "synthetic" in h and "noise" in h
