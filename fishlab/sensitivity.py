"""Sensitivity: what each part of the model costs when only that part is quantized (the bit allocator's input).

A *group* is a set of linears (by internal name): one projection in a block of consecutive layers, e.g.
"layers 0-4 w2" = `layers.0.feed_forward.w2` ... `layers.4.feed_forward.w2` (`layers_per_group=1`: one linear
per group). For every group and every candidate precision (a phase: INT8 per row, INT4 g128, ...), a hybrid =
the base model with only that group's linears taken from the phase's quantized checkpoint is compared with the
base by teacher-forced KL (`fishlab.fidelity.kl_by_layer_group_from_checkpoint`: the base alone resident, each
group's packed linears read from disk). ΔKL of a group = that KL (the base's own KL is 0).

    groups = linear_groups(cfg, layers_per_group=5)
    data = measure(base, {"1b": qdir_1b, "2c": qdir_2c}, phases, tokens, context, groups)

The tokens should be calibration text (never the evaluation text): the allocator decides on these numbers, and
the evaluation must not have been tuned on. The data is plain JSON (`FORMAT`), written beside a run and read
by `fishlab.allocate`.
"""
from __future__ import annotations

import time
from pathlib import Path

from .manifest import PROJECTIONS, linear_targets
from .sizes import linear_name

FORMAT = "fishlab sensitivity v1"
ROUTE = ("dense: each group's packed linears dequantized once into float32 nn.Linears (the packed values; the "
         "weight-only kernels are built for decode and are many times slower on these prefill-shaped matmuls)")


def _projection(s) -> str:
    """A linear's projection label: wqkv / wo / w1 / w2 / w3, or its own name outside the layer stack."""
    return s.projection or s.internal.rsplit(".", 2)[-2]


def linear_groups(cfg, layers_per_group: int = 5, target: str = "slow") -> list[dict]:
    """The groups of the target's linears: per projection, consecutive blocks of `layers_per_group` layers
    (a shorter last block when it does not divide), slow-AR layers first then fast-AR ones; a linear outside the
    layer stacks (S2 Pro's fast_output / fast_project_in) is its own group. Each group: {name, component,
    projection, layers, linears (internal module names), params}. `cfg` is a ModelConfig or its transformer."""
    t = getattr(cfg, "transformer", cfg)
    if not isinstance(layers_per_group, int) or layers_per_group < 1:
        raise ValueError(f"layers_per_group must be a positive integer, got {layers_per_group!r}")
    by_key: dict[tuple, list] = {}
    for s in linear_targets(t, target):
        name = linear_name(s)
        if s.layer is None:
            by_key.setdefault((s.component, name, None), []).append((s, name))
            continue
        block = s.layer // layers_per_group
        by_key.setdefault((s.component, _projection(s), block), []).append((s, name))
    proj_order = {p: i for i, p in enumerate(PROJECTIONS)}
    comp_order = {"slow_ar": 0, "fast_ar": 1}
    keys = sorted(by_key, key=lambda k: (comp_order.get(k[0], 2), k[2] is None, k[2] or 0,
                                         proj_order.get(k[1], len(proj_order)), k[1]))
    groups = []
    for comp, proj, block in keys:
        members = by_key[(comp, proj, block)]
        layers = sorted({s.layer for s, _ in members if s.layer is not None})
        prefix = "fast " if comp == "fast_ar" and block is not None else ""
        span = "" if not layers else (f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}")
        groups.append({"name": f"{prefix}{span} {proj}".strip(), "component": comp, "projection": proj,
                       "layers": layers, "linears": [n for _, n in members],
                       "params": sum(s.numel for s, _ in members)})
    return groups


def measure(base, quantized: dict[str, str | Path], phases: dict, tokens, context: int, groups: list[dict],
            base_out=None, text: dict | None = None, progress=None) -> dict:
    """ΔKL of every group at every precision: `quantized` = {phase name: its quantized checkpoint dir} (each
    made by `quantize_checkpoint` from the base's checkpoint), `phases` = {phase name: Phase}. The base model
    (loaded, float32 for a clean comparison) stays resident; each group's linears are read from each checkpoint
    in turn. Returns the sensitivity data (FORMAT): groups, precisions and one row per (group, precision)."""
    from .fidelity import compare_outputs, model_outputs, quantized_linears_from_checkpoint, swapped_linears
    from .trained_track import dense_for_eval
    if base_out is None:
        base_out = model_outputs(base, tokens, context)
    rows, t0 = [], time.perf_counter()
    for pname, qdir in quantized.items():
        if progress:
            progress(f"sensitivity: {len(groups)} groups at {pname}")
        for g in groups:
            try:
                donor = quantized_linears_from_checkpoint(qdir, g["linears"], base.device, base.dtype)
            except ValueError as e:
                raise ValueError(f"phase {pname} cannot stand for group {g['name']!r}: {e} (a sensitivity phase "
                                 f"must quantize every group's linears)") from None
            dense_for_eval(donor)                  # ROUTE: the packed values, as dense float32 weights
            with swapped_linears(base, donor, g["linears"]):
                r = compare_outputs(base_out, model_outputs(base, tokens, context))
            del donor
            rows.append({"group": g["name"], "precision": pname, "n_linears": len(g["linears"]),
                         **{k: r[k] for k in ("slow_kl_mean", "slow_kl_p99", "slow_top1", "slow_ln_ppl_ratio",
                                              "fast_kl_mean") if k in r}})
    return {"format": FORMAT, "model": base.cfg.name if hasattr(base.cfg, "name") else type(base).__name__,
            "tokens": {"chunks": int(tokens.size(0)), "ctx": int(tokens.size(1)), "context": int(context),
                       "scored": int(base_out.slow_logp.size(0)), "text": text},
            "groups": groups, "precisions": {n: phases[n].to_dict() for n in quantized},
            "rows": rows, "route": ROUTE, "seconds": time.perf_counter() - t0}


def delta_kl(row: dict) -> float:
    """The ΔKL a row predicts: slow-AR mean KL, plus the fast AR's mean KL where it is measured (S2 Pro)."""
    return float(row.get("slow_kl_mean") or 0.0) + float(row.get("fast_kl_mean") or 0.0)


def table(data: dict) -> dict[str, dict[str, float]]:
    """{group name: {precision: ΔKL}}."""
    out: dict[str, dict[str, float]] = {g["name"]: {} for g in data["groups"]}
    for r in data["rows"]:
        out[r["group"]][r["precision"]] = delta_kl(r)
    return out


def ranking(data: dict, precision: str) -> list[tuple[str, float]]:
    """Groups by ΔKL at one precision, most sensitive first."""
    t = table(data)
    return sorted(((g, v[precision]) for g, v in t.items() if precision in v), key=lambda kv: -kv[1])


def heatmap_rows(data: dict, precision: str) -> list[dict]:
    """Rows for `plots.heatmap`: one per linear (each linear of a group gets its group's ΔKL), with component,
    layer and projection, metric `delta_kl`."""
    t = table(data)
    out = []
    for g in data["groups"]:
        if precision not in t[g["name"]]:
            continue
        for layer in g["layers"] or [None]:
            out.append({"component": g["component"], "layer": layer, "projection": g["projection"],
                        "delta_kl": t[g["name"]][precision]})
    return out


def calibration_tokens(base, ckpt: str | Path, chunks: int = 1, ctx: int = 512, frames: int = 32):
    """The token matrix sensitivity is measured on, from calibration text (disjoint from the evaluation text):
    a text LM gets `chunks` chunks of `ctx` tokens of it (the first half of each is context); S2 Pro gets one
    TTS prompt of its first sentences followed by `frames` frames the base model generates for it (sampled with
    the API defaults, seed 0: the base model's own teacher-forced run). Returns (tokens, context, text info)."""
    from . import textdata
    from .fidelity import _is_text_lm, reference_tokens
    if _is_text_lm(base):
        from tokenizers import Tokenizer
        from . import spec
        tok = Tokenizer.from_file(str(Path(ckpt) / spec.TOKENIZER_FILE))
        cfg = base.cfg
        ids = tok.encode(textdata.text("calibration")).ids
        tokens = textdata.token_chunks(ids, chunks, ctx, cfg.bos_token_id if cfg.add_bos_token else None)
        return tokens, ctx // 2, textdata.text_info("calibration")
    from .prompt import build_tts_prompt
    from .tokenizer import load_tokenizer
    text = " ".join(textdata.text("calibration").split()[:24])
    prompt = build_tts_prompt(load_tokenizer(ckpt), text, base.cfg.num_codebooks, base.cfg.semantic_begin_id)
    tokens, P = reference_tokens(base, prompt, frames, seed=0)
    return tokens, P, dict(textdata.text_info("calibration"), prompt=text, frames=frames)


def from_checkpoint(ckpt: str | Path, phases: list, work_dir: str | Path, layers_per_group: int = 5,
                    target: str = "slow", chunks: int = 1, ctx: int = 512, frames: int = 32, progress=None,
                    projections: list[str] | None = None) -> dict:
    """Sensitivity of any checkpoint (the trained proxy, the synthetic demo, a real S2 Pro): each phase is
    quantized into work_dir (or an earlier complete output reused, `workbook.run_phase`), the base is loaded
    alone in float32 and each group's linears are swapped in from each quantized checkpoint in turn.
    `projections`: measure only the slow-AR groups of these projections (e.g. ["w2", "wo"])."""
    import torch

    from .model.load import load_transformer
    from .workbook import run_phase
    quantized = {}
    for ph in phases:
        if progress:
            progress(f"sensitivity: quantize {ph.name}")
        quantized[ph.name] = run_phase(Path(ckpt), ph, work_dir)["path"]
    base = load_transformer(ckpt, dtype=torch.float32)
    tokens, context, text = calibration_tokens(base, ckpt, chunks, ctx, frames)
    groups = linear_groups(base.cfg, layers_per_group, target)
    if projections is not None:
        groups = [g for g in groups if g["component"] == "slow_ar" and g["projection"] in projections]
    data = measure(base, quantized, {p.name: p for p in phases}, tokens, context, groups, text=text,
                   progress=progress)
    return dict(data, checkpoint=str(Path(ckpt).resolve()), layers_per_group=layers_per_group, target=target)
