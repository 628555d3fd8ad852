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
from .sources import ImportPhase, run_import

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
    phase and source (a complete output is one that was renamed into place, so it has quantization.json).
    An ImportPhase (a published quantization) is read into work_dir/import-<name> instead (fishlab.sources)."""
    if isinstance(phase, ImportPhase):
        return run_import(src, phase, work_dir, overwrite)
    out = phase_checkpoint_dir(work_dir, phase)
    q = read_quantization(out) if out.exists() else None
    if phase.spare and q is not None:     # a resolved spare phase remembers the phase file it came from
        recorded = ((q.get("phase") or {}).get("allocation") or {}).get("from")
    else:
        recorded = None if q is None else q.get("phase")
    same = q is not None and recorded == phase.to_dict() and q.get("source") == str(Path(src).resolve())
    if same and not overwrite and (out / METRICS_FILE).exists():
        metrics = json.loads((out / METRICS_FILE).read_text())["tensors"]
        return dict(q, metrics=metrics, reused=True, path=str(out))
    if phase.spare:
        from .allocate import resolve_spare
        phase = resolve_spare(src, phase, work_dir, progress=print if progress else None)
    result = quantize_checkpoint(src, out, phase, overwrite=out.exists(), progress=progress)
    return dict(result, reused=False, path=str(out))


def phase_summary(result: dict, phase: Phase, src: Path) -> dict:
    """The report-sized facts of one phase: sizes (measured, predicted, S2 Pro prediction), error totals by
    component and projection, worst tensors. This is the phase's side file and its row in all_results.json."""
    from .config import preset
    from .metrics import summarize

    m = result["metrics"]
    worst = sorted(m.items(), key=lambda kv: -kv[1]["rel_fro"])[:10]
    s2 = result.get("s2pro_estimate") or phase_estimate(preset("s2-pro"), phase)   # an import brings its own
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
        **({"import": result["import"]} if "import" in result else {}),
    }


def scheme_rows(phase, summary: dict) -> list[dict]:
    """The phase report's scheme table: what a phase quantizes how, or what an import's file stores."""
    if isinstance(phase, ImportPhase):
        imp = summary["import"]
        return [{"": k, "value": v} for k, v in [
            ("source", f"{imp['format']} file {imp['path']}"),
            ("size on disk", f"{imp['bytes']:,} bytes"),
            ("transformer tensors stored as", ", ".join(f"{n} x {k}" for k, n in imp["stored"].items())),
            ("quantized tensors (weight error measured)", summary["errors"]["tensors"]),
            ("codec", imp["codec"]),
            *(("note", n) for n in imp["notes"]),
        ]]
    return [{"": k, "value": v} for k, v in [
        ("method", "FP8 e4m3 (float8_e4m3fn)" if phase.method == "fp8" else
         f"INT{phase.bits} symmetric, range ±{int(phase.qmax)}"),
        ("granularity", "one scale per output row" if phase.group_size is None else
         f"groups of {phase.group_size} input features"),
        ("target", {"slow": "the linear weights of every slow-AR layer",
                    "all": "every linear of both ARs (slow, fast, fast output)"}[phase.target]),
        ("scale dtype", phase.scale_dtype),
        ("quantized tensors", summary["errors"]["tensors"]),
        ("kept as stored", "embeddings (incl. the tied head), norms, codec"),
    ]]


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
    if read_quantization(quantized) is None:           # an import: a plain checkpoint of dequantized weights
        (_, w_hat), = iter_tensors(read_headers(quantized)[0], [tensor])
    else:
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
    from .trained_track import phase_table
    out = Path(output_dir)
    phases = load_phase_results(out)
    sa = out / "size_analysis.json"
    pts = [(p["sizes"]["measured_bytes"], p["errors"]["rel_fro_mean"]) for p in phases]
    trained = load_trained_results(out)
    if trained:
        rows = {r["phase"]: r for r in phase_table(trained)}
        for p in phases:
            if p["phase"]["name"] in rows:
                p["trained"] = rows[p["phase"]["name"]]
        from .trained_track import issue_targets, method_grid, spared_rows
        sens = trained.get("sensitivity")
        trained = {"model": trained["model"], "evaluation": trained["evaluation"], "phases": list(rows.values()),
                   "methods": phase_table(trained, "methods"), "method_grid": method_grid(trained),
                   "targets": issue_targets(trained), "spared": spared_rows(trained),
                   "sensitivity": sens and {k: sens[k] for k in ("groups", "precisions", "rows", "tokens", "route")},
                   "allocation": trained.get("allocation"), "bf16_check": trained["bf16_check"]}
    return {
        "phases": {p["phase"]["name"]: p for p in phases},
        "pareto_size_vs_weight_error": [phases[i]["phase"]["name"] for i in pareto_front(pts)],
        "size_analysis": json.loads(sa.read_text()) if sa.exists() else None,
        "synthetic": any(p["synthetic"] for p in phases),
        "trained_model": trained,
        "format": "fishlab all_results v3",
    }


def kl_points(results: dict) -> dict:
    """The size-vs-KL chart's data: (S2 Pro predicted GB, KL) per phase. On a synthetic S2 Pro checkpoint the KL
    of random weights means little, so the trained-model KL is used where the phase ran on it; otherwise S2 Pro's
    teacher-forced KL (slow + fast mean)."""
    phases = list(results["phases"].values())
    use_trained = results["synthetic"] and any("trained" in p for p in phases)
    pts, names = [], []
    for p in phases:
        if use_trained and "trained" in p:
            y = p["trained"]["kl_mean"]
        elif not use_trained and "listening" in p:
            y = p["listening"]["slow_kl_mean"] + p["listening"]["fast_kl_mean"]
        else:
            continue
        pts.append((p["sizes"]["s2pro_predicted_total_gb"], y))
        names.append(p["phase"]["name"])
    label = ("mean KL on the trained proxy model (S2 Pro weights here are synthetic)" if use_trained
             else "teacher-forced KL (slow + fast mean)")
    return {"points": pts, "names": names, "ylabel": label, "trained": use_trained}


def wer_ranking(results: dict) -> list[dict]:
    """Phases with a measured word error rate, best (lowest tts WER) first."""
    rows = [dict(phase=p["label"], **{k: p["listening"].get(k) for k in ("wer_tts", "cer_tts", "wer_clone",
                                                                           "cer_clone", "wer_base_tts", "asr")})
            for p in results["phases"].values() if "listening" in p and "wer_tts" in p["listening"]]
    return sorted(rows, key=lambda r: (r["wer_tts"], r["wer_clone"] if r["wer_clone"] is not None else math.inf))


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
                                                       "clone": mine["clone"]["wav"],
                                                       "base_clone": base["clone"]["wav"]})}
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
    clips = listening["wer"]["clips"]
    rates = {f"{k}_{c}": clips[c][k] for c in ("tts", "clone", "base_tts") if c in clips for k in ("wer", "cer")}
    return {**rates, "asr": listening["wer"]["recognizer"],
            "slow_kl_mean": f["slow_kl_mean"], "slow_kl_p99": f["slow_kl_p99"], "slow_top1": f["slow_top1"],
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
    rows = {"speech (tts)": {"base": first["base"]["tts"]["wav"]},
            "speech (clone)": {"reference": first["reference"]["wav"], "base": first["base"]["clone"]["wav"]}}
    for r in results:
        s = r["listening_detail"]["samples"]
        rows["speech (tts)"][r["phase"]["name"]] = s["tts"]["wav"]
        rows["speech (clone)"][r["phase"]["name"]] = s["clone"]["wav"]
    order = ["reference", "base"] + [r["phase"]["name"] for r in results]
    return rows, order, any(r["synthetic"] for r in results)


# ----------------------------------------------------------------------------------------------------
# the trained-model track (issue 9): every phase on the trained proxy model
# ----------------------------------------------------------------------------------------------------

def trained_model_results(output_dir: str | Path, work_dir: str | Path | None = None,
                          phases: list[str] | None = None, params_dir: str | Path | None = None,
                          methods: list[str] | None = None, methods_dir: str | Path | None = "methods",
                          **kwargs) -> dict:
    """Run `trained_track.run_track` over the named phases (None: every phase file of params_dir) and method
    phases (None: every phase file of `methods_dir`, a folder under params_dir unless absolute; [] or
    methods_dir=None: none) and write its data to <output_dir>/trained_model.json (atomically)."""
    from .phases import default_params_dir, load_phase, load_phases
    from .trained_track import RESULTS_FILE, run_track
    chosen = load_phases(params_dir) if phases is None else [load_phase(p, params_dir) for p in phases]
    mdir = None if methods_dir is None else Path(params_dir or default_params_dir()) / methods_dir
    if methods is None:
        extra = load_phases(mdir) if mdir is not None and mdir.is_dir() else []
    else:
        extra = [load_phase(p, mdir) for p in methods]
    data = run_track(Path(work_dir or Path(output_dir) / "checkpoints"), chosen, methods=extra, **kwargs)
    write_json_atomic(Path(output_dir) / RESULTS_FILE, data)
    return data


def trained_model_intro(data: dict) -> str:
    m, e = data["model"], data["evaluation"]
    return (f"**{m['provenance']['model']}** ({m['params'] / 1e6:.1f}M parameters, `{m['provenance']['file']}`), "
            f"evaluated on {e['chunks']} chunks of {e['ctx']} tokens of CPython's documentation "
            f"({e['text']['topics']} pydoc topics, Python {e['text']['python']}; calibration text is a disjoint "
            f"set of topics): the first {e['context']} tokens of each chunk are context, the "
            f"{e['scored_tokens']} positions after them are scored. Base perplexity **{e['base_ppl']:.2f}**.")


def continuation_rows(data: dict) -> list[dict]:
    """[{model, <prompt>: continuation, ...}] for the base and every phase."""
    rows = [{"model": "base", **data["base_continuations"]}]
    rows += [{"model": r["label"], **r["continuations"]} for r in [*data["phases"], *data.get("methods", [])]
             if "continuations" in r]
    return rows


def load_trained_results(output_dir: str | Path) -> dict | None:
    from .trained_track import RESULTS_FILE
    p = Path(output_dir) / RESULTS_FILE
    return json.loads(p.read_text()) if p.exists() else None
