"""Size arithmetic on the manifest: exact bytes per component for each phase and GGUF type, weight traffic
per generated frame, and reconciliation with published checkpoint sizes.

Nothing here is typed in: every byte count follows from a config (via `fishlab.manifest`), a phase (via
`params/*.yaml`) and the packed format (`fishlab.quant.pack` layout: dense bit packing of each row-major
tensor, see docs/packed-format.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from . import spec
from .config import ModelConfig
from .manifest import COMPONENTS, TensorSpec, codec_manifest, linear_targets, transformer_manifest
from .phases import Phase
from .quant.pack import packed_nbytes

DATA = Path(__file__).resolve().parent / "data"
GB = 1e9


def n_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(cols / group_size)


def quantized_nbytes(shape: tuple, method: str, bits: int, group_size: int | None, scale_dtype: str,
                     zero_point: bool = False) -> dict:
    """{'data': ..., 'scales': ...} bytes of one 2-D weight [rows, cols] in fishlab's packed format: one dense
    stream of rows*cols values, a last partial group implied but not stored (docs/packed-format.md). 'scales'
    counts the per-group qparams: the scales, and the zero points (same shape and dtype) of a zero-point scheme."""
    rows, cols = shape
    groups = n_groups(cols, group_size)
    data = packed_nbytes(rows * cols, "fp8" if method == "fp8" else bits)
    return {"data": data, "scales": (2 if zero_point else 1) * rows * groups * spec.DTYPE_BYTES[scale_dtype]}


def linear_name(s: TensorSpec) -> str:
    """The internal module name of a linear weight's spec (`layers.3.feed_forward.w2`): what phase overrides
    match on."""
    return s.internal.removesuffix(".weight")


# ----------------------------------------------------------------------------------------------------
# one estimate = a rule that says, per tensor, how many bytes it takes
# ----------------------------------------------------------------------------------------------------

TensorBytes = Callable[[TensorSpec], dict]   # -> {'data': n, 'scales': n}


@dataclass(frozen=True)
class Estimate:
    name: str
    per_component: dict        # component -> bytes
    scale_bytes: int
    quantized_tensors: int
    quantized_params: int

    @property
    def transformer_bytes(self) -> int:
        return sum(v for k, v in self.per_component.items() if k != "codec")

    @property
    def total_bytes(self) -> int:
        return sum(self.per_component.values())

    def to_dict(self, bf16_transformer: int | None = None) -> dict:
        d = {"name": self.name, "per_component": dict(self.per_component), "scale_bytes": self.scale_bytes,
             "quantized_tensors": self.quantized_tensors, "quantized_params": self.quantized_params,
             "transformer_bytes": self.transformer_bytes, "total_bytes": self.total_bytes}
        if bf16_transformer:
            d["compression_vs_bf16"] = bf16_transformer / self.transformer_bytes
        return d


def _stored(s: TensorSpec, dtype: str | None = None) -> dict:
    return {"data": s.numel * spec.DTYPE_BYTES[dtype or s.dtype], "scales": 0}


def estimate(cfg: ModelConfig, name: str, rule: Callable[[TensorSpec], dict | None],
             base_dtype: str = "bfloat16", codec_dtype: str | None = "float32",
             norm_dtype: str | None = None) -> Estimate:
    """Bytes per component when `rule` gives the bytes of the tensors it quantizes (None = stored as is)."""
    per = {c: 0 for c in COMPONENTS}
    scales = nq = nparams = 0
    for s in transformer_manifest(cfg.transformer, base_dtype):
        b = rule(s)
        if b is None:
            b = _stored(s, norm_dtype if s.kind == "norm" else None)
        else:
            nq += 1
            nparams += s.numel
        per[s.component] += b["data"] + b["scales"]
        scales += b["scales"]
    if codec_dtype and cfg.codec is not None:
        per["codec"] = sum(s.numel for s in codec_manifest(cfg.codec)) * spec.DTYPE_BYTES[codec_dtype]
    else:
        del per["codec"]
    return Estimate(name, per, scales, nq, nparams)


def spare_linears(cfg: ModelConfig, spare: dict[str, int]) -> list[str]:
    """Stand-ins for the slow-AR linears a `spare: {projection: N}` keeps: per projection, the first N in layer
    order. Which ones the resolution keeps is measured (allocate.resolve_spare); the bytes are the same, since a
    projection's slow-AR linears all have one shape. A model with fewer than N keeps all of them (the resolution
    says so in its record)."""
    out = []
    for proj, n in spare.items():
        out += [linear_name(s) for s in linear_targets(cfg.transformer, "slow")
                if s.component == "slow_ar" and s.layer is not None and s.projection == proj][:n]
    return out


def spare_stand_in(cfg: ModelConfig, phase: Phase) -> Phase:
    """`phase` with its `spare` replaced by keep overrides on stand-in linears (`spare_linears`): what sizes
    count before the phase is resolved on a checkpoint (exact bytes; not which linears)."""
    if not phase.spare:
        return phase
    from dataclasses import replace
    keep = tuple({"match": n, "keep": True} for n in spare_linears(cfg, phase.spare))
    return replace(phase, spare={}, overrides=keep + tuple(phase.overrides))


def phase_rule(cfg: ModelConfig, phase: Phase, scale_dtype: str | None = None,
               target: str | None = None) -> Callable[[TensorSpec], dict | None]:
    """Bytes of each tensor under `phase`, tensor by tensor as quantize_checkpoint decides it
    (`Phase.tensor_phase`: the first matching override, else the phase on its target; an unresolved `spare`
    by `spare_stand_in`). `scale_dtype` / `target` replace the phase's own (for the size hypotheses)."""
    phase = spare_stand_in(cfg, phase)
    names = {s.name for s in linear_targets(cfg.transformer, target or phase.target)}

    def rule(s: TensorSpec):
        if s.kind != "linear":
            return None
        tp = phase.tensor_phase(linear_name(s), s.name in names)
        if tp is None:
            return None
        return quantized_nbytes(s.shape, tp.method, tp.bits, tp.group_size, scale_dtype or tp.scale_dtype,
                                tp.zero_point)
    return rule


def gguf_rule(bpw: float, which: str = "2d") -> Callable[[TensorSpec], dict | None]:
    """GGUF quantizes every 2-D tensor (linears and embeddings) at its bits per weight; norms stay F32."""
    def rule(s: TensorSpec):
        if len(s.shape) != 2 or (which == "linears" and s.kind != "linear"):
            return None
        return {"data": math.ceil(s.numel * bpw / 8), "scales": 0}
    return rule


def bf16_estimate(cfg: ModelConfig, codec_dtype: str | None = "float32") -> Estimate:
    return estimate(cfg, "bf16", lambda s: None, codec_dtype=codec_dtype)


def phase_estimate(cfg: ModelConfig, phase: Phase, scale_dtype: str | None = None,
                   codec_dtype: str | None = "float32") -> Estimate:
    return estimate(cfg, phase.name, phase_rule(cfg, phase, scale_dtype), codec_dtype=codec_dtype)


def load_gguf_types() -> dict[str, float]:
    return {k: float(v) for k, v in yaml.safe_load((DATA / "gguf_types.yaml").read_text()).items()}


def load_published() -> list[dict]:
    return yaml.safe_load((DATA / "published_sizes.yaml").read_text())


def gguf_estimate(cfg: ModelConfig, type_name: str, bpw: float, codec_dtype: str | None = "float16") -> Estimate:
    return estimate(cfg, type_name, gguf_rule(bpw), codec_dtype=codec_dtype, norm_dtype="float32")


# ----------------------------------------------------------------------------------------------------
# traffic per frame
# ----------------------------------------------------------------------------------------------------

def traffic_per_frame(cfg: ModelConfig, rule: Callable[[TensorSpec], dict | None]) -> dict:
    """Weight bytes read to generate one audio frame at batch 1: the slow AR once (its layers, final norm and
    the tied head = the whole token table; embedding lookups read only 1 + C rows), the fast AR once per
    codebook (C positions: its layers, norm and output head; C-1 fast-embedding rows). KV-cache and
    activation traffic are not counted."""
    t = cfg.transformer
    C = t.num_codebooks
    out = {"slow_ar": 0, "tied_head": 0, "fast_ar": 0, "embedding_rows": 0, "norms": 0}
    for s in transformer_manifest(t):
        b = rule(s)
        nbytes = (b["data"] + b["scales"]) if b is not None else s.nbytes
        row = s.nbytes // s.shape[0] if s.kind == "embedding" else 0
        if s.group == "slow_embeddings_tied_head":
            out["tied_head"] += nbytes
            out["embedding_rows"] += row
        elif s.group == "slow_codebook_embeddings":
            out["embedding_rows"] += C * row
        elif s.group == "fast_embeddings":
            out["embedding_rows"] += (C - 1) * row
        elif s.kind == "norm":
            out["norms"] += nbytes * (C if s.group in ("fast_layers", "fast_norm") else 1)
        elif s.component == "slow_ar":
            out["slow_ar"] += nbytes
        elif s.component == "fast_ar":
            out["fast_ar"] += C * nbytes
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------------
# the whole analysis
# ----------------------------------------------------------------------------------------------------

def size_analysis(cfg: ModelConfig, phases: list[Phase], scale_dtype: str | None = None) -> dict:
    """Everything the architecture report shows, as plain JSON-able data."""
    bf16 = bf16_estimate(cfg)
    base_t = bf16.transformer_bytes
    rows = [dict(bf16.to_dict(base_t), kind="baseline", label="bf16 (as shipped)")]
    for ph in phases:
        e = phase_estimate(cfg, ph, scale_dtype)
        rows.append(dict(e.to_dict(base_t), kind="phase", label=ph.label, method=ph.method, bits=ph.bits,
                         group_size=ph.group_size, target=ph.target,
                         scale_dtype=scale_dtype or ph.scale_dtype))
    for name, bpw in load_gguf_types().items():
        e = gguf_estimate(cfg, name, bpw)
        rows.append(dict(e.to_dict(base_t), kind="gguf", label=f"GGUF {name} ({bpw} bpw)", bpw=bpw))
    traffic = {"bf16": traffic_per_frame(cfg, lambda s: None)}
    for ph in phases:
        traffic[ph.name] = traffic_per_frame(cfg, phase_rule(cfg, ph, scale_dtype))
    return {
        "model": cfg.name,
        "params": {"transformer": sum(s.numel for s in transformer_manifest(cfg.transformer)),
                   "codec": sum(s.numel for s in codec_manifest(cfg.codec))},
        "scale_dtype_override": scale_dtype,
        "estimates": rows,
        "traffic_per_frame": traffic,
        "frames_per_second": cfg.codec.frames_per_second,
        "reconciliation": reconcile(cfg, phases, scale_dtype),
    }


def _hypotheses(cfg: ModelConfig, entry: dict, phases: dict[str, Phase], scale_dtype: str | None) -> list[tuple[str, int]]:
    """Named alternative layouts for a published file, each with its computed size."""
    key = str(entry["compare_to"])
    out: list[tuple[str, int]] = []
    codecs = [("codec fp32", "float32"), ("codec fp16", "float16"), ("no codec", None)]
    if key == "bf16":
        for cn, cd in codecs:
            out.append((f"every tensor bf16, {cn}", bf16_estimate(cfg, cd).total_bytes))
    elif key in phases:
        ph = phases[key]
        for cn, cd in codecs:
            for tgt, tdesc in (("slow", "slow-AR linears"), ("all", "all AR linears")):
                for sd in ("float32", "float16"):
                    e = estimate(cfg, "", phase_rule(cfg, ph, sd, tgt), codec_dtype=cd)
                    out.append((f"{ph.label.split(' ', 1)[1].rsplit(' ', 1)[0]} on {tdesc}, {sd} scales, "
                                f"rest bf16, {cn}", e.total_bytes))
            if ph.method == "fp8":   # FP8 of every 2-D tensor (embeddings too)
                rule = lambda s: {"data": s.numel, "scales": s.shape[0] * 4} if len(s.shape) == 2 else None
                out.append((f"FP8 on every 2-D tensor incl. embeddings, {cn}",
                            estimate(cfg, "", rule, codec_dtype=cd).total_bytes))
    else:
        bpw = load_gguf_types()[key]
        for cn, cd in codecs:
            for which, desc in (("2d", "every 2-D tensor"), ("linears", "linears only")):
                e = estimate(cfg, "", gguf_rule(bpw, which), codec_dtype=cd, norm_dtype="float32")
                out.append((f"{key} ({bpw} bpw) on {desc}, norms F32, {cn}", e.total_bytes))
    return out


def reconcile(cfg: ModelConfig, phases: list[Phase], scale_dtype: str | None = None) -> list[dict]:
    """Published size vs fishlab's estimate, and the computed layout that best explains the difference."""
    by_name = {p.name: p for p in phases}
    gguf = load_gguf_types()
    rows = []
    for entry in load_published():
        key = str(entry["compare_to"])
        if key == "bf16":
            ours = bf16_estimate(cfg)
        elif key in by_name:
            ours = phase_estimate(cfg, by_name[key], scale_dtype)
        elif key in gguf:
            ours = gguf_estimate(cfg, key, gguf[key])
        else:
            continue
        pub = float(entry["gb"]) * GB
        hyps = _hypotheses(cfg, entry, by_name, scale_dtype)
        best_name, best = min(hyps, key=lambda h: abs(h[1] - pub))
        rows.append({
            "published": entry["name"], "source": entry["source"], "compare_to": key,
            "published_gb": float(entry["gb"]), "fishlab_gb": ours.total_bytes / GB,
            "difference_gb": (pub - ours.total_bytes) / GB,
            "difference_pct": 100 * (pub - ours.total_bytes) / ours.total_bytes,
            "likely_layout": best_name, "likely_layout_gb": best / GB,
            "likely_residual_gb": (pub - best) / GB,
        })
    return rows
