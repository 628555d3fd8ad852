"""The tables and sentences of the phase report (notebooks/10_phase), built from its side file's data.

`summary` is what `workbook.phase_summary` returns (the phase's side file, 10_phase-<phase>.metrics.json);
`listening` is what `workbook.phase_listening` returns (stored in the side file as `listening_detail`). Each
function returns something a notebook displays (an HTML table or Markdown text), so the notebook only calls.
"""
from __future__ import annotations

from IPython.display import Markdown

from . import tables
from .tables import HTML, fmt_bytes


def size_table(summary: dict) -> HTML:
    sz = summary["sizes"]
    return tables.table([
        {"": "this checkpoint, measured on disk", "bytes": sz["measured_bytes"]},
        {"": "this checkpoint, predicted by the size analysis", "bytes": sz["predicted_bytes"]},
        {"": "source checkpoint on disk", "bytes": sz["source_bytes"]},
        {"": "S2 Pro transformer, predicted for this phase", "bytes": sz["s2pro_predicted_transformer_bytes"]},
    ], ["", ("bytes", "bytes", fmt_bytes)])


def size_text(summary: dict) -> Markdown:
    sz = summary["sizes"]
    return Markdown(f"Measured differs from predicted by **{sz['measured_vs_predicted_pct']:+.2f}%** "
                    f"(safetensors headers and the quantization description are not in the prediction); "
                    f"the checkpoint is {sz['compression_vs_source']:.2f}× smaller than its source. "
                    f"Full S2 Pro with this phase: {sz['s2pro_predicted_total_gb']:.2f} GB including the codec "
                    f"(fp32, or as the imported file ships it).")


def error_text(summary: dict) -> Markdown:
    err = summary["errors"]
    return Markdown(f"Mean relative Frobenius error **{err['rel_fro_mean']:.4f}**, mean SNR "
                    f"**{err['snr_db_mean']:.1f} dB**, lowest cosine {err['cosine_min']:.5f}, on average "
                    f"{err['zero_fraction_mean']:.1%} of non-zero weights rounded to 0.")


_ERROR_COLUMNS = [("key", "group"), "tensors", ("params", "parameters"), ("rel_fro", "rel. error (param-weighted)"),
                  ("mean_snr_db", "mean SNR dB"), ("worst", "worst tensor"), ("worst_rel_fro", "worst rel. error")]


def error_tables(summary: dict) -> list[HTML]:
    """The weight error by component and by projection."""
    err = summary["errors"]
    return [tables.table([{"key": k, **v} for k, v in err[by].items()], _ERROR_COLUMNS, caption=caption)
            for by, caption in (("by_component", "By component"), ("by_projection", "By projection"))]


def worst_tensors_table(summary: dict) -> HTML:
    return tables.table(summary["worst_tensors"], ["tensor", "component", "layer", "projection", "rel_fro", "snr_db",
                                                   "cosine"])


def clip_paths(listening: dict, name: str) -> dict[str, str]:
    """The report's clips (label -> wav path): the reference voice, base and phase, plain TTS and voice clone."""
    return {"reference": listening["reference"]["wav"],
            "base · tts": listening["base"]["tts"]["wav"], f"{name} · tts": listening["samples"]["tts"]["wav"],
            "base · clone": listening["base"]["clone"]["wav"], f"{name} · clone": listening["samples"]["clone"]["wav"]}


def listening_rows(audio: dict, name: str) -> dict:
    """`audio` (label -> clip, as clip_paths labels them) arranged for `report.audio.listening_grid`."""
    return {"speech (tts)": {"base": audio["base · tts"], name: audio[f"{name} · tts"]},
            "speech (clone)": {"reference": audio["reference"], "base": audio["base · clone"],
                               name: audio[f"{name} · clone"]}}


def fidelity_tables(listening: dict) -> list[HTML]:
    """Teacher-forced fidelity: slow / fast AR totals, per fast codebook, and per layer group when measured."""
    f = listening["fidelity"]
    out = [
        tables.table([
            {"": "slow AR next token (allowed tokens)", "mean KL": f["slow_kl_mean"], "p99 KL": f["slow_kl_p99"],
             "top-1 agreement": f["slow_top1"]},
            {"": "fast AR, codebooks 1..C-1", "mean KL": f["fast_kl_mean"], "p99 KL": f["fast_kl_p99"],
             "top-1 agreement": f["fast_top1"]},
        ], caption=f"Teacher-forced fidelity vs the base model ({f['generated_frames']} frames of the base sample)"),
        tables.table(f["fast_per_codebook"], ["codebook", ("kl_mean", "mean KL"), ("kl_p99", "p99 KL"), ("top1", "top-1")],
                     caption="Per fast-AR codebook"),
    ]
    if listening["kl_by_layer_group"]:
        out.append(tables.table(listening["kl_by_layer_group"],
                                ["group", "n_linears", ("slow_kl_mean", "slow KL"), ("fast_kl_mean", "fast KL")],
                                caption="Which layers hurt: only this group quantized"))
    return out


def generation_rows(listening: dict, name: str) -> list[dict]:
    """One row per generated sample (base and phase, tts and clone): speed, memory, audio level."""
    rows = []
    for who, s in (("base", listening["base"]), (name, listening["samples"])):
        for kind, x in s.items():
            rows.append({"sample": f"{who} {kind}", "frames": x["frames"], "stop": x["stop_reason"],
                         "seconds": x["seconds"], "frames/s": x["frames_per_s"], "RTF": x["real_time_factor"],
                         "peak RSS": x["peak_rss_bytes"], "RMS dBFS": x["stats"]["rms_dbfs"], "peak": x["stats"]["peak"],
                         "clipped": x["stats"]["clipped_fraction"]})
    return rows


def generation_table(listening: dict, name: str) -> HTML:
    return tables.table(generation_rows(listening, name),
                        ["sample", "frames", "stop", "seconds", "frames/s", "RTF", ("peak RSS", "peak RSS", fmt_bytes),
                         "RMS dBFS", "peak", "clipped"], caption="Generation speed (end to end, CPU) and audio")


def memory_text(listening: dict) -> Markdown:
    wb = listening["weight_bytes"]
    return Markdown(f"Model weights in memory: **{fmt_bytes(wb['total'])}** "
                    f"(base {fmt_bytes(listening['base_weight_bytes']['total'])}); "
                    f"packed linears {fmt_bytes(wb['quantized_linears'])}.")


def speaker_table(listening: dict) -> HTML:
    sp = listening.get("speaker") or {}
    return tables.table([{"pair": k.replace("_", " "), "cosine": v} for k, v in sp.items()],
                        caption="Speaker similarity (resemblyzer)")


def wer_table(listening: dict) -> HTML:
    w = listening["wer"]
    return tables.table([{"clip": k, "transcript": v["transcript"], "WER": v["wer"], "CER": v["cer"]}
                         for k, v in w["clips"].items()],
                        caption=f"Word / character error rate ({w['recognizer']}) against: {w['text']}")


def listening_tables(listening: dict, name: str) -> list:
    """Everything the listening section shows after the clips, in order."""
    return [*fidelity_tables(listening), generation_table(listening, name), memory_text(listening),
            speaker_table(listening), wer_table(listening)]
