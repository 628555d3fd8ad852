"""Audio in reports: players, spectrograms and listening grids that work from the HTML file alone, plus an
ipywidgets explorer for live JupyterLab sessions.

Choices (the same everywhere in this module):

- **Players embed a 24-bit PCM WAV** as a `data:audio/wav;base64,...` URI (`WAV_SUBTYPE = "PCM_24"`). Every
  browser that plays WAV plays 16- and 24-bit PCM in a plain (non-extensible) WAV header; 32-bit float WAV
  (format 3) plays in current Chrome and Firefox but support elsewhere is less certain, so it is not the default
  (`subtype="FLOAT"` is accepted for bit-exact embedding). 24-bit is lossless for listening: the rounding step
  is 2^-23 (quantisation noise near -146 dBFS, far below the -100 dB floor of the spectrograms and any
  playback chain). Cost: 132 kB per second of 44.1 kHz mono, 176 kB once base64-encoded.
- **Never normalised.** Samples are written as they are, so level differences between phases stay audible.
  The only changes: samples beyond [-1, 1] are clipped (PCM cannot hold them) and NaN/Inf samples become 0;
  both are stated in the player's caption, which also shows duration, RMS level (dBFS) and peak
  (`fishlab.audio.audio_stats`, computed on the samples before clipping).
- **Spectrograms** are |STFT| (torch.stft, periodic Hann window, n_fft=2048, hop=512, centred, zero padded) in
  dB relative to a full-scale sine: magnitudes are divided by sum(window)/2, so a sine of amplitude 1 peaks at
  0 dB. Every spectrogram uses the same fixed colour scale, vmin_db=-100 to vmax_db=0 by default, so colours
  compare across clips, phases and reports.
- **Static HTML only** (no JavaScript): reports are rendered by papermill to self-contained HTML.
  `explorer()` is the only interactive part and renders nothing unless `enabled=True`; reports call it as
  `explorer(..., enabled=live)` with a notebook parameter `live = False`, so papermill renders never contain
  widgets; set `live = True` when working in JupyterLab.
"""
from __future__ import annotations

import base64
import html
import io
import math
import random
import string
from typing import Mapping, Sequence

import numpy as np
import torch

from ..audio import DEFAULT_SR, as_mono_numpy, audio_stats
from .tables import HTML, note

__all__ = ["WAV_SUBTYPE", "VMIN_DB", "VMAX_DB", "audio_player", "wav_data_uri", "spectrogram_db",
           "average_spectrum_db", "spectrogram_figure", "spectrogram_image", "listening_grid", "explorer",
           "synthetic_audio_note"]

WAV_SUBTYPE = "PCM_24"
WAV_SUBTYPES = ("PCM_24", "FLOAT")
VMIN_DB = -100.0
VMAX_DB = 0.0
N_FFT = 2048
HOP = 512
CMAP = "magma"


# ----------------------------------------------------------------------------------------------- players

def _playable(audio) -> tuple[np.ndarray, dict]:
    """Mono float32 samples ready to embed (non-finite -> 0, clipped to [-1, 1]) and what was changed."""
    a = np.array(as_mono_numpy(audio), dtype=np.float32, copy=True)
    bad = ~np.isfinite(a)
    n_nonfinite = int(bad.sum())
    if n_nonfinite:
        a[bad] = 0.0
    over = np.abs(a) > 1.0
    n_clipped = int(over.sum())
    if n_clipped:
        np.clip(a, -1.0, 1.0, out=a)
    return a, {"n_nonfinite": n_nonfinite, "n_clipped": n_clipped}


def wav_data_uri(audio, sr: int = DEFAULT_SR, subtype: str = WAV_SUBTYPE) -> tuple[str, dict]:
    """`data:audio/wav;base64,...` of mono audio ([N], [1, N] or [1, 1, N]) and what was changed
    ({"n_nonfinite", "n_clipped"}): not normalised, only clipped to [-1, 1] and NaN/Inf set to 0."""
    import soundfile as sf

    if subtype not in WAV_SUBTYPES:
        raise ValueError(f"subtype must be one of {WAV_SUBTYPES}, got {subtype!r}")
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sample rate must be a positive int, got {sr!r}")
    a, changes = _playable(audio)
    buf = io.BytesIO()
    sf.write(buf, a, int(sr), subtype=subtype, format="WAV")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), changes


def _caption(audio, sr: int, label: str | None, changes: dict, stats: bool) -> str:
    parts = [f"<b>{html.escape(label)}</b>"] if label else []
    if stats:
        s = audio_stats(audio, sr)
        rms = "−∞" if s["rms_dbfs"] == float("-inf") else f"{s['rms_dbfs']:.1f}"
        parts.append(f"{s['duration_s']:.2f} s · rms {rms} dBFS · peak {s['peak']:.3f}")
    warn = []
    if changes["n_clipped"]:
        n = changes["n_clipped"]
        warn.append(f"clipped: {n:,} sample{'s' if n != 1 else ''} beyond ±1 set to ±1 for playback")
    if changes["n_nonfinite"]:
        n = changes["n_nonfinite"]
        warn.append(f"{n:,} NaN/Inf sample{'s' if n != 1 else ''} set to 0 for playback")
    parts += [f'<span style="color:#b00020">⚠ {w}</span>' for w in warn]
    return " · ".join(parts)


def audio_player(audio, sr: int = DEFAULT_SR, label: str | None = None, stats: bool = True,
                 subtype: str = WAV_SUBTYPE) -> HTML:
    """An `<audio controls>` element playing `audio` from a data URI (lossless WAV, not normalised), with a
    caption: label, duration / RMS dBFS / peak (stats=True), and a warning if samples were clipped or NaN."""
    uri, changes = wav_data_uri(audio, sr, subtype)
    cap = _caption(audio, sr, label, changes, stats)
    cap_html = f'<div style="font-size:0.8em;color:#333;margin-bottom:2px">{cap}</div>' if cap else ""
    return HTML(f'<div class="fishlab-audio" style="margin:2px 0">{cap_html}'
                f'<audio controls preload="metadata" style="width:100%;min-width:220px" src="{uri}"></audio>'
                f'</div>')


# ------------------------------------------------------------------------------------------ spectrograms

def _stft_mag(audio, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| / (sum(window)/2), [n_fft//2 + 1, frames]; a full-scale sine peaks at 1 (0 dB)."""
    a = np.nan_to_num(as_mono_numpy(audio).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    x = torch.from_numpy(np.ascontiguousarray(a))
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    win = torch.hann_window(n_fft, dtype=torch.float32)
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, window=win, center=True, pad_mode="constant",
                      return_complex=True)
    return (spec.abs() / (win.sum() / 2)).numpy()


def spectrogram_db(audio, sr: int = DEFAULT_SR, n_fft: int = N_FFT, hop: int = HOP) -> tuple[np.ndarray, float]:
    """(dB magnitudes [n_fft//2 + 1, frames] relative to a full-scale sine, duration in seconds)."""
    mag = _stft_mag(audio, n_fft, hop)
    n = as_mono_numpy(audio).size
    return 20 * np.log10(np.maximum(mag, 1e-12)), n / sr


def average_spectrum_db(audio, sr: int = DEFAULT_SR, n_fft: int = N_FFT,
                        hop: int = HOP) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies in Hz, mean power over frames in dB re full-scale sine) — the long-term spectrum."""
    mag = _stft_mag(audio, n_fft, hop)
    power = (mag.astype(np.float64) ** 2).mean(axis=1)
    return np.fft.rfftfreq(n_fft, 1 / sr), 10 * np.log10(np.maximum(power, 1e-24))


def _draw_spec(ax, audio, sr, vmin_db, vmax_db, n_fft, hop):
    db, dur = spectrogram_db(audio, sr, n_fft, hop)
    frames_s = db.shape[1] * hop / sr
    return ax.imshow(db, origin="lower", aspect="auto", cmap=CMAP, vmin=vmin_db, vmax=vmax_db,
                     extent=(0, frames_s, 0, sr / 2 / 1000), interpolation="nearest")


def spectrogram_figure(clips: Mapping[str, object], sr: int = DEFAULT_SR, vmin_db: float = VMIN_DB,
                       vmax_db: float = VMAX_DB, n_fft: int = N_FFT, hop: int = HOP, cols: int | None = None,
                       title: str | None = None):
    """Small multiples of log-magnitude spectrograms, one per clip (label -> audio), on one shared colour
    scale [vmin_db, vmax_db] (dB re full-scale sine) and shared time / frequency axes, with one colour bar."""
    import matplotlib.pyplot as plt

    if not clips:
        raise ValueError("spectrogram_figure needs at least one clip")
    n = len(clips)
    cols = cols or min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.8, 2.3 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    im, t_max = None, 0.0
    for ax, (label, audio) in zip(axes.flat, clips.items()):
        im = _draw_spec(ax, audio, sr, vmin_db, vmax_db, n_fft, hop)
        t_max = max(t_max, im.get_extent()[1])
        ax.set_title(str(label), fontsize=9)
    axes[0, 0].set_xlim(0, t_max)                       # shared: the longest clip sets the time axis
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("kHz")
    for j in range(cols):                               # time labels under the lowest panel of each column
        low = axes[(n - 1 - j) // cols, j] if j < n else None
        if low is not None:
            low.xaxis.set_tick_params(labelbottom=True)
            low.set_xlabel("s")
    fig.colorbar(im, ax=list(axes.flat), label="dB re full-scale sine", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def spectrogram_image(audio, sr: int = DEFAULT_SR, vmin_db: float = VMIN_DB, vmax_db: float = VMAX_DB,
                      n_fft: int = N_FFT, hop: int = HOP, size: tuple[float, float] = (3, 1.4), dpi: int = 80,
                      duration_s: float | None = None) -> HTML:
    """A small spectrogram (no axes; 0 to sr/2 bottom to top, same fixed dB colour scale) as a PNG data-URI
    `<img>`, for grid cells. duration_s fixes the time axis (e.g. the longest clip of a row) so lengths compare."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    _draw_spec(ax, audio, sr, vmin_db, vmax_db, n_fft, hop)
    if duration_s:
        ax.set_xlim(0, duration_s)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    w, h = int(round(size[0] * dpi)), int(round(size[1] * dpi))
    desc = f"spectrogram, 0 to {sr / 2000:g} kHz bottom to top, {vmin_db:g} to {vmax_db:g} dB re full-scale sine"
    return HTML(f'<img src="{uri}" width="{w}" height="{h}" alt="{desc}" title="{desc}" '
                f'style="display:block;margin-top:2px">')


# --------------------------------------------------------------------------------------- listening grid

def _letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        s, k = "", i
        while True:
            s = string.ascii_uppercase[k % 26] + s
            k = k // 26 - 1
            if k < 0:
                break
        out.append(s)
    return out


def _phase_order(rows: Mapping[str, Mapping[str, object]], phase_order: Sequence[str] | None) -> list[str]:
    order = list(phase_order or [])
    if len(set(order)) != len(order):
        raise ValueError(f"phase_order has duplicates: {order}")
    for phases in rows.values():
        for p in phases:
            if p not in order:
                order.append(p)
    return order


_TH = 'style="text-align:left;border-bottom:2px solid #444;padding:3px 8px"'
_TD = 'style="vertical-align:top;text-align:left;padding:4px 8px;border-bottom:1px solid #ddd"'


def listening_grid(rows: Mapping[str, Mapping[str, object]], sr: int = DEFAULT_SR,
                   phase_order: Sequence[str] | None = None, blind: bool = False, seed: int = 0,
                   reference: bool = False, spectrograms: bool = True, stats: bool | None = None,
                   vmin_db: float = VMIN_DB, vmax_db: float = VMAX_DB, caption: str | None = None) -> HTML:
    """Table utterances × phases (rows: utterance -> {phase -> audio}); each cell a player and a small
    spectrogram (time axis shared along a row). phase_order lists phases base first (phases found in rows but
    not listed follow in order of appearance); a missing clip shows "–".

    blind=True: per utterance the phases are shuffled (random.Random(seed), reproducible) into columns
    A, B, C, ...; phase names appear only in a collapsed `<details><summary>Key</summary>` table below.
    reference=True (blind only) adds a first, labelled column with phase_order[0] (MUSHRA-style open
    reference); the same clip is still hidden among the lettered columns. stats (duration / RMS / peak in each
    caption) defaults to on, off in blind mode (levels would give phases away); clipping and NaN warnings always
    show. Static HTML, no JavaScript."""
    if not rows:
        raise ValueError("listening_grid needs at least one utterance")
    order = _phase_order(rows, phase_order)
    rng = random.Random(seed)
    letters = _letters(len(order))
    ref = order[0] if (blind and reference) else None
    stats = (not blind) if stats is None else stats

    def cell(clip, dur) -> str:
        if clip is None:
            return f"<td {_TD}>–</td>"
        body = str(audio_player(clip, sr, stats=stats))
        if spectrograms:
            body += str(spectrogram_image(clip, sr, vmin_db, vmax_db, duration_s=dur))
        return f"<td {_TD}>{body}</td>"

    heads = ["utterance"] + ([f"reference ({ref})"] if ref else []) + (letters if blind else order)
    out = ['<div class="fishlab-listening-grid" style="overflow-x:auto">',
           '<table class="fishlab-table" style="border-collapse:collapse;font-size:0.9em">']
    if caption:
        out.append(f'<caption style="text-align:left;font-weight:bold;padding:4px 0">{html.escape(caption)}</caption>')
    out.append("<thead><tr>" + "".join(f"<th {_TH}>{html.escape(h)}</th>" for h in heads) + "</tr></thead><tbody>")
    key_rows = []
    for utt, clips in rows.items():
        cols = rng.sample(order, len(order)) if blind else order
        durs = [as_mono_numpy(c).size / sr for c in clips.values()]
        dur = max(durs) if durs else None
        cells = [f'<td {_TD}><div style="max-width:16em">{html.escape(str(utt))}</div></td>']
        if ref:
            cells.append(cell(clips.get(ref), dur))
        cells += [cell(clips.get(p), dur) for p in cols]
        out.append("<tr>" + "".join(cells) + "</tr>")
        if blind:
            key_rows.append((utt, [p if p in clips else f"{p} (missing)" for p in cols]))
    out.append("</tbody></table>")
    if blind:
        out.append('<details style="margin:6px 0"><summary>Key</summary>'
                   '<table class="fishlab-table" style="border-collapse:collapse;font-size:0.9em"><thead><tr>'
                   + "".join(f"<th {_TH}>{html.escape(h)}</th>" for h in ["utterance"] + letters)
                   + "</tr></thead><tbody>")
        for utt, names in key_rows:
            out.append(f"<tr><td {_TD}>{html.escape(str(utt))}</td>"
                       + "".join(f"<td {_TD}>{html.escape(n)}</td>" for n in names) + "</tr>")
        out.append(f"</tbody></table><div style='font-size:0.8em;color:#555'>shuffled with seed {seed}</div>"
                   "</details>")
    out.append("</div>")
    return HTML("".join(out))


# ---------------------------------------------------------------------------------------------- explorer

def explorer(rows: Mapping[str, Mapping[str, object]], sr: int = DEFAULT_SR,
             phase_order: Sequence[str] | None = None, enabled: bool = False, n_fft: int = N_FFT,
             hop: int = HOP):
    """Interactive explorer for live JupyterLab (ipywidgets): pick an utterance and a phase to play it
    (IPython.display.Audio, not normalised), and two phases to compare their average spectra.

    Returns None (renders nothing) unless enabled=True. Reports call `explorer(..., enabled=live)` where
    `live` is a notebook parameter defaulting to False, so papermill renders contain no widgets."""
    if not enabled:
        return None
    try:
        import ipywidgets as w
        from IPython.display import Audio, display
    except ImportError as e:
        raise ImportError("explorer() needs ipywidgets and IPython (pip install ipywidgets)") from e
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("explorer needs at least one utterance")
    order = _phase_order(rows, phase_order)
    utts = list(rows)
    utt = w.Dropdown(options=utts, value=utts[0], description="utterance")
    phase = w.Dropdown(options=order, value=order[0], description="play")
    pa = w.Dropdown(options=order, value=order[0], description="spectrum A")
    pb = w.Dropdown(options=order, value=order[min(1, len(order) - 1)], description="spectrum B")
    out_play, out_spec = w.Output(), w.Output()

    def play(*_):
        clip = rows[utt.value].get(phase.value)
        with out_play:
            out_play.clear_output(wait=True)
            if clip is None:
                print(f"no clip for phase {phase.value!r} of this utterance")
                return
            a, changes = _playable(clip)
            display(Audio(a, rate=sr, normalize=False))
            display(HTML(_caption(clip, sr, None, changes, True)))

    def spectra(*_):
        with out_spec:
            out_spec.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(8, 3.2))
            for p, color in ((pa.value, "#1f77b4"), (pb.value, "#d62728")):
                clip = rows[utt.value].get(p)
                if clip is None:
                    continue
                f, db = average_spectrum_db(clip, sr, n_fft, hop)
                ax.semilogx(f[1:], db[1:], label=p, color=color, lw=1)
            ax.set_xlabel("Hz")
            ax.set_ylabel("mean power, dB re full-scale sine")
            ax.set_ylim(VMIN_DB, VMAX_DB + 5)
            ax.set_title(f"average spectrum: {utt.value}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    utt.observe(lambda *_: (play(), spectra()), names="value")
    phase.observe(play, names="value")
    pa.observe(spectra, names="value")
    pb.observe(spectra, names="value")
    play()
    spectra()
    return w.VBox([w.HBox([utt, phase]), out_play, w.HBox([pa, pb]), out_spec])


def synthetic_audio_note() -> HTML:
    """The warning to show above any audio made with the synthetic demo checkpoint."""
    return note("These clips come from the synthetic demo checkpoint (random weights, no training): the audio "
                "is noise, not speech. Players and spectrograms show the pipeline works end to end; listening "
                "to them or comparing their similarity says nothing about quantization quality. Use --checkpoint "
                "with the real S2 Pro weights for meaningful audio.", kind="warn")
