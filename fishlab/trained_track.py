"""The trained-model track: every phase applied to a real trained transformer of S2 Pro's family (the proxy
model of `fishlab.trained`), measured with S2 Pro's own fidelity code.

Random weights say nothing about which phase keeps quality; a trained network does. The track quantizes the
proxy checkpoint with each phase through the same `quantize_checkpoint`, loads it through the same
`load_transformer` (packed `QuantizedLinear`s) and compares it with the base on real text through the same
`fishlab.fidelity` functions (llama.cpp `--kl-divergence` definitions: KL mean / median / p99, top-1
agreement, ln(PPL_q / PPL_base)), over chunks of evaluation text (`fishlab.textdata`).

    track = TrainedTrack.open(work_dir)             # base model, tokenizer, evaluation chunks, base outputs
    row = track.evaluate(phase)                      # quantize (or reuse), KL, size, weight error, continuation
    data = run_track(work_dir, phases, methods=..., sensitivity={...}, allocation={...})   # the whole report
    track.bf16_check()                               # how far storing the dequantized model in bf16 is from lossless

Everything runs in float32 on CPU by default (the base model is the exact dequantization of the GGUF).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import textdata
from .calibration import CalibrationError
from .config import load_config
from .fidelity import ModelOutputs, fidelity_report, model_outputs
from .io import write_json_atomic
from .manifest import linear_targets
from .model.load import load_transformer, model_weight_bytes
from .model.textlm import TextLM, generate_greedy_ids
from .phases import Phase
from .quant.apply import QuantizeError
from .quant.primitives import QuantError, SchemeError
from .sizes import bf16_estimate, phase_estimate, phase_rule, spare_stand_in

PROMPTS = ("The capital of France is", "The three primary colors are")
DEFAULT_CHUNKS = 4          # x DEFAULT_CTX tokens: about 5 s per model on 2 cores (float32)
DEFAULT_CTX = 512           # llama.cpp's default context for perplexity / KL


def linear_bits_per_weight(cfg, phase: Phase) -> float:
    """Stored bits per weight of the linears a phase covers (its target, and any linear an override quantizes),
    scales and zero points included, a kept linear at bf16's 16 bits (the KL-vs-bits x axis). Byte counts are
    `sizes.phase_rule`'s, tensor by tensor as quantize_checkpoint decides them."""
    rule = phase_rule(cfg, phase)
    target = {s.name for s in linear_targets(cfg.transformer, phase.target)}
    nbytes = numel = 0
    for s in linear_targets(cfg.transformer, "all"):
        b = rule(s)
        if s.name in target or b is not None:
            nbytes += s.numel * 2 if b is None else b["data"] + b["scales"]
            numel += s.numel
    return 8 * nbytes / numel


EVAL_ROUTE = ("dense: packed weights dequantized once at load (float32); teacher-forced evaluation runs "
              "prefill-shaped matmuls of hundreds of tokens, where the weight-only kernels (built for decode) are "
              "many times slower than a dense matmul; the values are the packed model's, dequant(quant(W))")


def dense_for_eval(model: TextLM) -> TextLM:
    """The model for teacher-forced evaluation: every QuantizedLinear replaced (in place) by an nn.Linear holding
    exactly its dequantized weight in float32 (see EVAL_ROUTE; the memory cost is a float32 model, 540 MB for
    SmolLM2-135M)."""
    import torch.nn as nn
    from .model.dualar import replace_linears
    from .quant.qlinear import QuantizedLinear

    def dense(name: str, lin: nn.Module):
        if not isinstance(lin, QuantizedLinear):
            return None
        out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        out.weight = nn.Parameter(lin.dequantized_weight(torch.float32).contiguous(), requires_grad=False)
        if lin.bias is not None:
            out.bias = nn.Parameter(lin.bias.float(), requires_grad=False)
        return out
    replace_linears(model, dense, names=[n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)])
    return model.eval()


def _tokenizer(ckpt: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(ckpt / "tokenizer.json"))


@dataclass
class TrainedTrack:
    ckpt: Path
    work_dir: Path
    base: TextLM
    tokenizer: object
    tokens: torch.Tensor               # [n_chunks, ctx] evaluation chunks
    context: int                       # first scored position of a chunk (llama.cpp: half the chunk)
    base_out: ModelOutputs
    base_seconds: float
    prompts: tuple = PROMPTS
    max_new_tokens: int = 24
    continuations: dict = field(default_factory=dict)

    @classmethod
    def open(cls, work_dir: str | Path, ckpt: str | Path | None = None, n_chunks: int = DEFAULT_CHUNKS,
             ctx: int = DEFAULT_CTX, prompts: tuple = PROMPTS, max_new_tokens: int = 24) -> "TrainedTrack":
        """Load the base model (the proxy checkpoint, converted on first use, unless `ckpt` is given), cut the
        evaluation text into n_chunks chunks of ctx tokens and run the base model on them once."""
        from .trained import trained_checkpoint
        ckpt = Path(ckpt) if ckpt else trained_checkpoint()
        base = load_transformer(ckpt, dtype=torch.float32)
        if not isinstance(base, TextLM):
            raise ValueError(f"{ckpt}: the trained-model track needs a text-LM checkpoint (model_type "
                             f"fishlab_text_lm), this one builds a {type(base).__name__}")
        tok = _tokenizer(ckpt)
        cfg = base.cfg
        ids = tok.encode(textdata.text("evaluation")).ids
        tokens = textdata.token_chunks(ids, n_chunks, ctx, cfg.bos_token_id if cfg.add_bos_token else None)
        t0 = time.perf_counter()
        base_out = model_outputs(base, tokens, ctx // 2)
        track = cls(ckpt, Path(work_dir), base, tok, tokens, ctx // 2, base_out, time.perf_counter() - t0,
                    tuple(prompts), max_new_tokens)
        track.continuations["base"] = track.continue_all(base)
        return track

    # --- pieces ---
    def continue_all(self, model: TextLM) -> dict[str, str]:
        """Greedy continuation of every prompt (text you can read)."""
        cfg = model.cfg
        out = {}
        for p in self.prompts:
            ids = ([cfg.bos_token_id] if cfg.add_bos_token else []) + self.tokenizer.encode(p).ids
            new = generate_greedy_ids(model, ids, self.max_new_tokens, stop_ids=(cfg.eos_token_id,))
            out[p] = self.tokenizer.decode(new, skip_special_tokens=True)
        return out

    @property
    def cfg(self):
        """The proxy checkpoint's ModelConfig (sizes and targets are computed from it)."""
        return load_config(self.ckpt)

    def eval_info(self) -> dict:
        return {"route": EVAL_ROUTE, "chunks": int(self.tokens.size(0)), "ctx": int(self.tokens.size(1)), "context": self.context,
                "scored_tokens": int(self.base_out.slow_logp.size(0)), "text": textdata.text_info("evaluation"),
                "base_ppl": math.exp(float(self.base_out.slow_nll.double().mean())),
                "base_seconds": self.base_seconds}

    def quantized_dir(self, phase: Phase) -> Path:
        return self.work_dir / "trained" / f"phase-{phase.name}"

    # --- one phase ---
    def evaluate(self, phase: Phase, overwrite: bool = False) -> dict:
        """Quantize the proxy with `phase` (or reuse a complete earlier output), load it packed, and measure it:
        fidelity vs the base, size, weight error, speed of the evaluation, greedy continuations."""
        from .workbook import phase_summary, run_phase
        result = run_phase(self.ckpt, phase, self.work_dir / "trained", overwrite=overwrite)
        summary = phase_summary(result, phase, self.ckpt)
        model = load_transformer(result["path"], dtype=torch.float32)
        weight_bytes = model_weight_bytes(model)["total"]          # packed, as loaded
        dense_for_eval(model)
        t0 = time.perf_counter()
        fid = fidelity_report(self.base, model, self.tokens, self.context, base_out=self.base_out)
        seconds = time.perf_counter() - t0
        cont = self.continue_all(model)
        self.continuations[phase.name] = cont
        cfg = load_config(self.ckpt)
        est = phase_estimate(cfg, phase, codec_dtype=None)
        return {
            "phase": phase.to_dict(), "label": phase.label, "method": phase.method, "bits": phase.bits,
            "group_size": phase.group_size,
            "bits_per_weight": linear_bits_per_weight(cfg, phase),
            "size": {"measured_bytes": summary["sizes"]["measured_bytes"],
                     "bf16_layout_bytes": est.transformer_bytes,
                     "bf16_base_bytes": bf16_estimate(cfg, codec_dtype=None).transformer_bytes,
                     "weight_bytes_in_memory": weight_bytes},
            "errors": {k: summary["errors"][k] for k in ("tensors", "rel_fro_mean", "snr_db_mean", "cosine_min",
                                                         "zero_fraction_mean")},
            "fidelity": {k: v for k, v in fid.items() if k != "method"},
            "eval_seconds": seconds, "eval_route": EVAL_ROUTE, "quantize_seconds": result.get("seconds"),
            "reused": result["reused"],
            # a `spare` phase: the linears it kept on this model, each with its measured ΔKL
            "spared": ((result.get("phase") or {}).get("allocation") or {}).get("spared") if phase.spare else None,
            "continuations": cont,
        }

    def bf16_check(self) -> dict:
        """How far holding the base (the exact float32 dequantization of the GGUF) in bfloat16 is from lossless:
        share of weights bf16 cannot represent exactly, their relative error, and the KL of a model whose weights
        are rounded to bf16 (computed in float32, so only the storage differs)."""
        from .model.dualar import linear_names
        rounded = load_transformer(self.ckpt, dtype=torch.float32)
        n = inexact = 0
        ss_w = ss_e = 0.0
        for p in rounded.parameters():
            w = p.data
            r = w.to(torch.bfloat16).float()
            n += w.numel()
            inexact += int((r != w).sum())
            ss_w += float(w.double().square().sum())
            ss_e += float((r - w).double().square().sum())
            p.data = r
        fid = fidelity_report(self.base, rounded, self.tokens, self.context, base_out=self.base_out)
        return {"weights": n, "not_exact_in_bf16": inexact / n, "rel_fro": math.sqrt(ss_e / ss_w),
                "linears": len(linear_names(rounded)),
                "fidelity": {k: v for k, v in fid.items() if k != "method"}}


def llamacpp_anchors() -> dict:
    """llama.cpp's published Llama-3-8B mean KL per GGUF type (fishlab/data/llamacpp_kld.yaml)."""
    import yaml
    return yaml.safe_load((Path(__file__).resolve().parent / "data" / "llamacpp_kld.yaml").read_text())


# ----------------------------------------------------------------------------------------------------
# the whole track, as the 15_trained_model report runs it
# ----------------------------------------------------------------------------------------------------

RESULTS_FILE = "trained_model.json"      # run-wide side file, read by the summary


def _values_key(cfg, phase: Phase) -> tuple:
    """What decides a phase's stored values on this model: each linear's own scheme as quantize_checkpoint
    decides it (`Phase.tensor_phase(...).scheme_key()`, None = kept). Phases that differ only where the model has
    no linear (S2 Pro's fast AR on a text LM: 1b, 2a, spare-fast) get the same key."""
    from .sizes import linear_name
    target = {s.name for s in linear_targets(cfg.transformer, phase.target)}
    out = [tuple(sorted(phase.spare.items()))]          # a spare phase's kept linears are measured, not known
    phase = spare_stand_in(cfg, phase)
    for s in linear_targets(cfg.transformer, "all"):
        tp = phase.tensor_phase(linear_name(s), s.name in target)
        out.append(None if tp is None else tp.scheme_key())
    return tuple(out)


#: What a phase can fail with on a given model and is reported as that phase's row (the rest propagates).
QUANTIZE_FAILURES = (QuantError, SchemeError, QuantizeError, CalibrationError)


def _evaluate_all(track: "TrainedTrack", phases: list[Phase], done: dict, progress=None, kind: str = "phase") -> list[dict]:
    """One row per phase; a phase with the same values as one measured before reuses its row (`same_as`). A
    phase that cannot be quantized (a scheme or quantizer this model's weights do not admit, a calibration that
    fails: QUANTIZE_FAILURES) gets a row with its error, shown in the reports; it is not dropped. Any other
    exception is a bug and propagates."""
    rows = []
    for ph in phases:
        if progress:
            progress(f"trained model: {kind} {ph.name}")
        key = _values_key(track.cfg, ph)
        if key in done:
            row = dict(done[key], phase=ph.to_dict(), label=ph.label, same_as=done[key]["phase"]["name"])
            track.continuations[ph.name] = row.get("continuations", {})
        else:
            try:
                row = track.evaluate(ph)
            except QUANTIZE_FAILURES as e:          # recorded in the row and the report, never hidden
                row = {"phase": ph.to_dict(), "label": ph.label, "error": f"{type(e).__name__}: {e}"}
            done[key] = row
        rows.append(row)
    return rows


def run_track(work_dir: str | Path, phases: list[Phase], n_chunks: int = DEFAULT_CHUNKS, ctx: int = DEFAULT_CTX,
              sensitivity: dict | None = None, allocation: dict | None = None, methods: list[Phase] = (),
              bf16: bool = True, ckpt: str | Path | None = None, progress=None) -> dict:
    """Every phase on the trained proxy (phases whose values are the same on a text LM - e.g. 1b and 2a, whose
    targets differ only on S2 Pro's fast AR - are quantized and measured once), the per-method comparison
    (`methods`: more phases, rows marked as such), the sensitivity of groups of linears on calibration text
    (`sensitivity`: {phases: [names among phases/methods], layers_per_group, chunks, ctx}), a mixed-precision
    phase allocated from it and measured like any phase (`allocation`: {budget_phase | budget_bits, name,
    candidates}), and the bf16 check. Returns the data of trained_model.json."""
    from . import allocate as A
    from . import sensitivity as S
    track = TrainedTrack.open(work_dir, ckpt, n_chunks, ctx)
    done: dict = {}
    rows = _evaluate_all(track, phases, done, progress)
    method_rows = _evaluate_all(track, list(methods), done, progress, "method")
    by_name = {p.name: p for p in [*phases, *methods]}
    sens, alloc = None, None
    if sensitivity and sensitivity.get("phases"):
        chosen = [by_name[n] for n in sensitivity["phases"]]
        if progress:
            progress(f"trained model: sensitivity at {', '.join(p.name for p in chosen)}")
        tokens, context, text = S.calibration_tokens(track.base, track.ckpt, sensitivity.get("chunks", 1),
                                                     sensitivity.get("ctx", DEFAULT_CTX))
        from .workbook import run_phase
        quantized = {p.name: run_phase(track.ckpt, p, track.work_dir / "trained")["path"] for p in chosen}
        sens = S.measure(track.base, quantized, {p.name: p for p in chosen}, tokens, context,
                         S.linear_groups(track.base.cfg, sensitivity.get("layers_per_group", 5)), text=text)
        write_json_atomic(track.work_dir / "trained" / "sensitivity.json", sens)
    if sens and allocation:
        cfg = load_config(track.ckpt)
        name = allocation.get("name", "mixed")
        from .phases import load_phase
        bp = allocation.get("budget_phase")
        budget_phase = (by_name.get(bp) or load_phase(bp)) if bp else None
        a = A.allocate(sens, cfg, budget_phase=budget_phase, budget_bits=allocation.get("budget_bits"),
                       candidates=allocation.get("candidates"), keep=allocation.get("keep", True))
        keys = A.allocation_phase(sens, a, name, budget={k: allocation[k] for k in ("budget_phase", "budget_bits")
                                                           if allocation.get(k)})
        path = A.write_phase_file(track.work_dir / "trained" / f"{name}.yaml", keys)
        mixed = load_phase(path)
        rows += _evaluate_all(track, [mixed], done, progress, "allocated phase")
        alloc = {"phase_file": str(path), "keys": keys, "choice_rows": A.choice_rows(sens, a.choice),
                 "budget_transformer_bytes": phase_estimate(cfg, budget_phase, codec_dtype=None).transformer_bytes
                 if budget_phase else None}
    cfg = track.base.cfg
    from .trained import gguf_provenance
    return {
        "model": {"checkpoint": str(track.ckpt), "provenance": gguf_provenance(track.ckpt),
                  "architecture": {k: getattr(cfg, k) for k in ("architecture", "n_layer", "dim", "intermediate_size",
                                                                "n_head", "n_local_heads", "head_dim", "vocab_size",
                                                                "rope_base", "norm_eps", "max_seq_len")},
                  "params": sum(p.numel() for p in track.base.parameters())},
        "evaluation": track.eval_info(),
        "base_continuations": track.continuations["base"],
        "phases": rows,
        "methods": method_rows,
        "sensitivity": sens,
        "allocation": alloc,
        "bf16_check": track.bf16_check() if bf16 else None,
        "llamacpp": llamacpp_anchors(),
        "format": "fishlab trained_model v2",
    }


def phase_table(data: dict, which: str = "phases") -> list[dict]:
    """One flat row per phase (or per method phase: which="methods") for tables and all_results.json; a phase
    that failed has only its name, label and error."""
    out = []
    for r in data.get(which) or []:
        if "error" in r:
            out.append({"phase": r["phase"]["name"], "label": r["label"], "error": r["error"]})
            continue
        f = r["fidelity"]
        out.append({"phase": r["phase"]["name"], "label": r["label"], "same_as": r.get("same_as"),
                    "bits_per_weight": r["bits_per_weight"], "size_bytes": r["size"]["measured_bytes"],
                    "bf16_layout_bytes": r["size"]["bf16_layout_bytes"], "rel_fro": r["errors"]["rel_fro_mean"],
                    "kl_mean": f["slow_kl_mean"], "kl_median": f["slow_kl_median"], "kl_p99": f["slow_kl_p99"],
                    "top1": f["slow_top1"], "ln_ppl_ratio": f["slow_ln_ppl_ratio"], "ppl": f["slow_ppl"],
                    "quantizer": r["phase"].get("quantizer", "rtn"), "zero_point": r["phase"].get("zero_point", False),
                    "overrides": len(r["phase"].get("overrides") or []),
                    "continuation": next(iter(r["continuations"].values()), "")})
    return out


def _plain(phase: dict) -> bool:
    """A phase with one scheme on every linear of its target: no overrides, nothing spared."""
    return not phase.get("overrides") and not phase.get("spare")


def method_grid(data: dict) -> list[dict]:
    """The method x bits table: one row per (bits, group size), one column per quantizer (+ 'zp' for a zero-point
    variant), the mean KL of the plan phases and method phases with one scheme everywhere (`_plain`); with the
    best of the row."""
    cells: dict[tuple, dict] = {}
    for r in phase_table(data) + phase_table(data, "methods"):
        if "error" in r:
            continue
        ph = next(x["phase"] for x in [*data["phases"], *data.get("methods", [])] if x["phase"]["name"] == r["phase"])
        if not _plain(ph) or ph["method"] != "int":       # mixed phases (mixed-1b, baicai-style) are not a cell
            continue
        col = ph["quantizer"] + ("+zp" if ph["zero_point"] else "")
        row = cells.setdefault((ph["bits"], ph["group_size"]), {"scheme": f"INT{ph['bits']} "
                                                                + ("row" if ph["group_size"] is None else f"g{ph['group_size']}")})
        row.setdefault(col, r["kl_mean"])
    out = []
    for key in sorted(cells, key=lambda k: (-k[0], k[1] or 0)):
        row = cells[key]
        vals = {k: v for k, v in row.items() if k != "scheme"}
        best = min(vals, key=vals.get)
        out.append(dict(row, best=best, best_kl=vals[best],
                        best_vs_rtn=vals[best] / vals["rtn"] if vals.get("rtn") else None))
    return out


ISSUE_TARGETS = (
    ("INT4 g128: best method's mean KL <= 0.6 x RTN's", (4, 128), "rtn", 0.6),
    ("INT3 g128: best method's mean KL <= INT4 g128 RTN's", (3, 128), ("int4", 128), 1.0),
    ("INT2 g64: best method's mean KL <= 0.2 x RTN's", (2, 64), "rtn", 0.2),
)


def issue_targets(data: dict) -> list[dict]:
    """Issue 10's four targets on the trained model, each met / NOT met with the measured numbers (or 'not
    measured' when a row it needs is missing or failed)."""
    grid = {(int(g["scheme"].split()[0][3:]), None if g["scheme"].endswith("row") else int(g["scheme"].split("g")[-1])): g
            for g in method_grid(data)}
    out = []
    for text, key, ref, factor in ISSUE_TARGETS:
        row = grid.get(key)
        ref_row = grid.get((4, 128)) if isinstance(ref, tuple) else row
        if not row or not ref_row or "rtn" not in ref_row:
            out.append({"target": text, "status": "not measured", "measured": ""})
            continue
        best, ref_kl = row["best_kl"], ref_row["rtn"]
        ok = best <= factor * ref_kl
        out.append({"target": text, "status": "met" if ok else "NOT met",
                    "measured": f"best {row['best']} {best:.4g} vs {factor:g} x {ref_kl:.4g} = {factor * ref_kl:.4g}"})
    text = "mixed precision at the size of 1b: lower mean KL than 1b"
    rows = {r["phase"]: r for r in phase_table(data)}
    alloc = data.get("allocation")
    name = alloc["keys"]["phase"] if alloc else None
    if not alloc or name not in rows or "error" in rows[name] or "1b" not in rows or "error" in rows["1b"]:
        out.append({"target": text, "status": "not measured", "measured": ""})
    else:
        m, b = rows[name], rows["1b"]
        ok = m["kl_mean"] < b["kl_mean"] and m["bf16_layout_bytes"] <= b["bf16_layout_bytes"]
        out.append({"target": text, "status": "met" if ok else "NOT met",
                    "measured": f"{name} {m['kl_mean']:.4g} at {m['bf16_layout_bytes']:,} B vs 1b {b['kl_mean']:.4g} "
                                f"at {b['bf16_layout_bytes']:,} B (predicted {alloc['keys']['allocation']['predicted_kl']:.4g})"})
    return out


def pareto_rows(data: dict) -> list[dict]:
    """Every measured phase and method phase as (bits per weight, mean KL, name, quantizer), for the
    size-vs-KL chart of all methods."""
    return [r for r in phase_table(data) + phase_table(data, "methods") if "error" not in r]


def spared_rows(data: dict) -> list[dict]:
    """The linears each `spare` phase (e.g. the baicai-style preset) kept in bf16 on this model, most sensitive
    first per projection, with the ΔKL that ranked them."""
    out = []
    for r in [*data["phases"], *data.get("methods", [])]:
        for proj, picked in (r.get("spared") or {}).items():
            out += [{"phase": r["phase"]["name"], "projection": proj, "linear": x["linear"], "delta_kl": x["delta_kl"]}
                    for x in picked]
    return out
