"""What the workbook notebooks call: resolve the input checkpoint, run a phase (or reuse its output), turn
metrics into report-sized summaries, collect all phases into all_results.json. Plain functions on paths and
dicts, so tests reach every line a notebook runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import spec
from .checkpoint import iter_tensors, read_headers
from .config import PRESETS, load_config
from .demo import SYNTHETIC_NOTE, demo_checkpoint, is_synthetic
from .io import atomic_path, write_json_atomic
from .phases import Phase
from .quant.apply import METRICS_FILE, dequantized_state_dict, quantize_checkpoint, read_quantization
from .sizes import GB, phase_estimate

PHASE_SIDE_SUFFIX = ".metrics.json"


def resolve_checkpoint(checkpoint: str | None, preset: str = "demo") -> Path:
    """The checkpoint a report works on: the given directory, or the demo checkpoint (built on first use).
    Only the demo can be built: any other preset needs real weights on disk."""
    if checkpoint:
        p = Path(checkpoint).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {p}")
        return p
    if preset != "demo":
        raise ValueError(f"preset {preset!r} has no weights to quantize; pass checkpoint=<dir> (the real files), "
                         f"or use preset 'demo' (known presets: {', '.join(sorted(PRESETS))})")
    return demo_checkpoint()


def synthetic_note(ckpt: Path) -> str | None:
    return SYNTHETIC_NOTE if is_synthetic(ckpt) else None


def phase_checkpoint_dir(work_dir: str | Path, phase: Phase) -> Path:
    return Path(work_dir) / f"phase-{phase.name}"


def run_phase(src: Path, phase: Phase, work_dir: str | Path, overwrite: bool = False,
              progress: bool = False) -> dict:
    """Quantize src with phase into work_dir/phase-<name>, or reuse a complete earlier output of the same
    phase and source (a complete output is one that was renamed into place, so it has quantization.json)."""
    out = phase_checkpoint_dir(work_dir, phase)
    q = read_quantization(out) if out.exists() else None
    same = q is not None and q.get("phase") == phase.to_dict() and q.get("source") == str(Path(src).resolve())
    if same and not overwrite and (out / METRICS_FILE).exists():
        metrics = json.loads((out / METRICS_FILE).read_text())["tensors"]
        return dict(q, metrics=metrics, reused=True, path=str(out))
    result = quantize_checkpoint(src, out, phase, overwrite=out.exists(), progress=progress)
    return dict(result, reused=False, path=str(out))


def phase_summary(result: dict, phase: Phase, src: Path) -> dict:
    """The report-sized facts of one phase: sizes (measured, predicted, S2 Pro prediction), error totals by
    component and projection, worst tensors. This is the phase's side file and its row in all_results.json."""
    from .config import preset
    from .metrics import summarize

    m = result["metrics"]
    worst = sorted(m.items(), key=lambda kv: -kv[1]["rel_fro"])[:10]
    s2 = phase_estimate(preset("s2-pro"), phase)
    base_bytes = sum(f.stat().st_size for f in Path(src).iterdir() if f.is_file())
    return {
        "phase": phase.to_dict(),
        "label": phase.label,
        "synthetic": is_synthetic(src),
        "checkpoint": str(src),
        "quantized_checkpoint": result["path"],
        "sizes": {
            "measured_bytes": result["measured_bytes"],
            "predicted_bytes": result["predicted"]["total"],
            "measured_vs_predicted_pct": 100 * (result["measured_bytes"] / result["predicted"]["total"] - 1),
            "source_bytes": base_bytes,
            "compression_vs_source": base_bytes / result["measured_bytes"],
            "s2pro_predicted_transformer_bytes": s2.transformer_bytes,
            "s2pro_predicted_total_gb": s2.total_bytes / GB,
        },
        "errors": {
            "tensors": len(m),
            "rel_fro_mean": sum(v["rel_fro"] for v in m.values()) / max(1, len(m)),
            "snr_db_mean": sum(v["snr_db"] for v in m.values() if math.isfinite(v["snr_db"])) / max(1, len(m)),
            "cosine_min": min((v["cosine"] for v in m.values()), default=1.0),
            "zero_fraction_mean": sum(v["zero_fraction"] for v in m.values()) / max(1, len(m)),
            "by_component": summarize(m, "component"),
            "by_projection": summarize(m, "projection"),
        },
        "worst_tensors": [{"tensor": k, "rel_fro": v["rel_fro"], "snr_db": v["snr_db"], "cosine": v["cosine"],
                           "layer": v["layer"], "projection": v["projection"], "component": v["component"]}
                          for k, v in worst],
        "seconds": result.get("seconds"),
        "reused": result.get("reused", False),
    }


def write_side_file(output_dir: str | Path, report_name: str, data: dict) -> Path:
    p = Path(output_dir) / f"{report_name}{PHASE_SIDE_SUFFIX}"
    write_json_atomic(p, data)
    return p


def layer_rows(metrics: dict[str, dict]) -> list[dict]:
    """One row per quantized tensor, sorted by component, layer, projection (for tables and heatmaps)."""
    rows = [dict(tensor=k, **{f: v[f] for f in ("component", "layer", "projection", "rel_fro", "snr_db", "cosine",
                                                 "max_abs", "mean_abs", "zero_fraction")}) for k, v in metrics.items()]
    order = {"slow_ar": 0, "fast_ar": 1}
    return sorted(rows, key=lambda r: (order.get(r["component"], 2), -1 if r["layer"] is None else r["layer"],
                                       str(r["projection"])))


def weight_pairs(src: Path, quantized: Path, tensor: str, n: int = 4000, seed: int = 0) -> dict:
    """A random sample of (original, reconstructed) weight values of one tensor, for scatter plots."""
    infos, _ = read_headers(src)
    (_, w), = iter_tensors(infos, [tensor])
    w_hat = dequantized_state_dict(quantized)[tensor]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, w.numel(), (min(n, w.numel()),), generator=g)
    return {"w": w.float().reshape(-1)[idx].tolist(), "w_hat": w_hat.float().reshape(-1)[idx].tolist()}


def load_phase_results(output_dir: str | Path) -> list[dict]:
    """Every phase side file of a run, sorted by phase name."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(output_dir).glob(f"*{PHASE_SIDE_SUFFIX}"))]
    return sorted([r for r in rows if "phase" in r], key=lambda r: r["phase"]["name"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be minimised (size, error)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def collect_results(output_dir: str | Path) -> dict:
    """all_results.json: every phase's summary, the size analysis if present, and the Pareto set of
    (measured size, mean relative error)."""
    out = Path(output_dir)
    phases = load_phase_results(out)
    sa = out / "size_analysis.json"
    pts = [(p["sizes"]["measured_bytes"], p["errors"]["rel_fro_mean"]) for p in phases]
    return {
        "phases": {p["phase"]["name"]: p for p in phases},
        "pareto_size_vs_weight_error": [phases[i]["phase"]["name"] for i in pareto_front(pts)],
        "size_analysis": json.loads(sa.read_text()) if sa.exists() else None,
        "synthetic": any(p["synthetic"] for p in phases),
        "format": "fishlab all_results v1",
    }


def write_all_results(output_dir: str | Path) -> tuple[Path, dict]:
    data = collect_results(output_dir)
    p = Path(output_dir) / "all_results.json"
    write_json_atomic(p, data)
    return p, data


def describe_source(src: Path) -> dict:
    cfg = load_config(src)
    return {"path": str(src), "model": cfg.name, "synthetic": is_synthetic(src),
            "files": sorted(f.name for f in src.iterdir() if f.is_file()),
            "has_codec": (src / spec.CODEC_FILE).exists()}


# ----------------------------------------------------------------------------------------------------
# listening and fidelity (issue 5): samples, teacher-forced KL, speed, audio and speaker metrics
# ----------------------------------------------------------------------------------------------------

def phase_listening(src: Path, quantized: Path, phase: Phase, settings, output_dir: str | Path,
                    work_dir: str | Path, layer_groups: bool = True, speaker: bool = True,
                    asr_model: str | None = None) -> dict:
    """Everything a phase report says about sound: the phase's TTS and cloned samples next to the base
    model's (same seed and settings), teacher-forced KL of the phase model on the base sample's tokens (slow and
    per fast codebook; per layer group when asked), generation speed and memory, audio stats and speaker
    similarity. Writes the wavs into <output_dir>/audio/."""
    from . import samples as S
    from .asr import word_error
    from .fidelity import cached_model_outputs, fidelity_report, kl_by_layer_group_from_checkpoint
    from .model.load import load_transformer, model_weight_bytes, routes
    from .tokenizer import load_tokenizer

    audio_dir = Path(output_dir) / "audio"
    ref, base = S.base_samples(src, Path(work_dir), settings)
    S.publish([ref["wav"], base["tts"]["wav"], base["clone"]["wav"]], audio_dir)
    # one model resident at a time: the base's teacher-forced outputs are cached on disk (base loaded alone)
    dtype, device = getattr(torch, settings.dtype), "cuda" if torch.cuda.is_available() else "cpu"
    tokens, P = S.sample_tokens(load_tokenizer(src), settings.text, S.load_codes(base["tts"]["wav"]),
                                load_config(src).transformer.semantic_begin_id)
    base_cached = cached_model_outputs(src, tokens, P, Path(work_dir) / "samples", dtype, device)
    model, codec, tok = S.load_stack(quantized, settings.dtype, device)
    mine = S.synthesize_pair(model, codec, tok, settings, Path(ref["wav"]), audio_dir, phase.name)
    weights, model_routes = model_weight_bytes(model), routes(model)
    with S.threads_for(model):
        fid = fidelity_report(base_cached, model, tokens, P, base_cached.outputs)
    del model
    groups = []
    if layer_groups:                      # the base alone + one group's packed linears at a time
        base_model = load_transformer(src, device=device, dtype=dtype)
        with S.threads_for(base_model):
            groups = kl_by_layer_group_from_checkpoint(base_model, quantized, tokens, P, base_out=base_cached.outputs)
        del base_model
    base_weights = base_cached.weight_bytes

    out = {"reference": ref, "base": base, "samples": mine, "fidelity": fid, "kl_by_layer_group": groups,
           "weight_bytes": weights, "base_weight_bytes": base_weights, "routes": model_routes,
           "settings": settings.key(str(src)),
           "wer": word_error(asr_model, settings.text, {"base_tts": base["tts"]["wav"], "tts": mine["tts"]["wav"],
                                                       "clone": mine["clone"]["wav"]})}
    if speaker:
        emb = lambda p: _speaker_embedding(p, codec.sample_rate, cache=Path(p).parent != audio_dir)  # noqa: E731
        with S.threads_for(codec):
            e = {k: emb(p) for k, p in (("ref", ref["wav"]), ("base_tts", base["tts"]["wav"]),
                                        ("base_clone", base["clone"]["wav"]), ("tts", mine["tts"]["wav"]),
                                        ("clone", mine["clone"]["wav"]))}
        from .speaker import cosine
        out["speaker"] = {"clone_vs_reference": cosine(e["clone"], e["ref"]),
                          "base_clone_vs_reference": cosine(e["base_clone"], e["ref"]),
                          "tts_vs_base_tts": cosine(e["tts"], e["base_tts"]),
                          "clone_vs_base_clone": cosine(e["clone"], e["base_clone"])}
    return out


def _speaker_embedding(wav: str | Path, sr: int, cache: bool):
    """Speaker embedding of a wav; the reference's and base samples' are cached beside them (.spk.npy) so
    every phase report reuses them."""
    import numpy as np

    from .audio import read_audio
    from .speaker import speaker_embedding
    npy = Path(wav).with_suffix(".spk.npy")
    if cache and npy.exists() and npy.stat().st_mtime >= Path(wav).stat().st_mtime:
        return np.load(npy)
    e = speaker_embedding(read_audio(wav, sr), sr)
    if cache:
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, e)
    return e


def listening_summary(listening: dict) -> dict:
    """The few numbers of a phase's listening section that go into all_results.json."""
    f = listening["fidelity"]
    s = listening.get("speaker") or {}
    gen = listening["samples"]["tts"]
    return {"slow_kl_mean": f["slow_kl_mean"], "slow_kl_p99": f["slow_kl_p99"], "slow_top1": f["slow_top1"],
            "fast_kl_mean": f["fast_kl_mean"], "fast_top1": f["fast_top1"],
            "frames_per_s": gen["frames_per_s"], "real_time_factor": gen["real_time_factor"],
            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in listening["samples"].values()),
            "weight_bytes": listening["weight_bytes"]["total"],
            "speaker_clone_vs_reference": s.get("clone_vs_reference"),
            "speaker_tts_vs_base": s.get("tts_vs_base_tts")}


def listening_rows(output_dir: str | Path) -> tuple[dict, list, bool]:
    """For the listening grid: {utterance: {column: wav path}}, the column order (reference, base, phases)
    and whether any phase ran on synthetic weights; from the phase side files of a run."""
    results = [r for r in load_phase_results(output_dir) if "listening_detail" in r]
    if not results:
        raise RuntimeError(f"no phase results with samples in {output_dir}: run the 10_phase reports with tts")
    first = results[0]["listening_detail"]
    rows = {"narration (tts)": {"base": first["base"]["tts"]["wav"]},
            "narration (clone)": {"reference": first["reference"]["wav"], "base": first["base"]["clone"]["wav"]}}
    for r in results:
        s = r["listening_detail"]["samples"]
        rows["narration (tts)"][r["phase"]["name"]] = s["tts"]["wav"]
        rows["narration (clone)"][r["phase"]["name"]] = s["clone"]["wav"]
    order = ["reference", "base"] + [r["phase"]["name"] for r in results]
    return rows, order, any(r["synthetic"] for r in results)
