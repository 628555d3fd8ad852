"""The trained-model track: every phase applied to a real trained transformer of S2 Pro's family (the proxy
model of `fishlab.trained`), measured with S2 Pro's own fidelity code.

Random weights say nothing about which phase keeps quality; a trained network does. The track quantizes the
proxy checkpoint with each phase through the same `quantize_checkpoint`, loads it through the same
`load_transformer` (packed `QuantizedLinear`s) and compares it with the base on real text through the same
`fishlab.fidelity` functions (llama.cpp `--kl-divergence` definitions: KL mean / median / p99, top-1
agreement, ln(PPL_q / PPL_base)), over chunks of evaluation text (`fishlab.textdata`).

    track = TrainedTrack.open(work_dir)             # base model, tokenizer, evaluation chunks, base outputs
    row = track.evaluate(phase)                      # quantize (or reuse), KL, size, weight error, continuation
    rows = track.sensitivity(phase, n_groups=6)      # one layer group quantized at a time
    track.bf16_check()                               # how far storing the dequantized model in bf16 is from lossless

Everything runs in float32 on CPU by default (the base model is the exact dequantization of the GGUF).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import textdata
from .config import load_config
from .fidelity import ModelOutputs, default_layer_groups, fidelity_report, kl_by_layer_group, model_outputs
from .manifest import linear_targets
from .model.load import load_transformer, model_weight_bytes
from .model.textlm import TextLM, generate_greedy_ids
from .phases import Phase
from .sizes import bf16_estimate, phase_estimate, quantized_nbytes

PROMPTS = ("The capital of France is", "The three primary colors are")
DEFAULT_CHUNKS = 4          # x DEFAULT_CTX tokens: about 5 s per model on 2 cores (float32)
DEFAULT_CTX = 512           # llama.cpp's default context for perplexity / KL


def linear_bits_per_weight(cfg, phase: Phase) -> float:
    """Stored bits per weight of the linears a phase quantizes, scales included (the KL-vs-bits x axis)."""
    specs = linear_targets(cfg.transformer, phase.target)
    nbytes = sum(sum(quantized_nbytes(s.shape, phase.method, phase.bits, phase.group_size,
                                      phase.scale_dtype).values()) for s in specs)
    return 8 * nbytes / sum(s.numel for s in specs)


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

    def eval_info(self) -> dict:
        return {"chunks": int(self.tokens.size(0)), "ctx": int(self.tokens.size(1)), "context": self.context,
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
                     "weight_bytes_in_memory": model_weight_bytes(model)["total"]},
            "errors": {k: summary["errors"][k] for k in ("tensors", "rel_fro_mean", "snr_db_mean", "cosine_min",
                                                         "zero_fraction_mean")},
            "fidelity": {k: v for k, v in fid.items() if k != "method"},
            "eval_seconds": seconds, "quantize_seconds": result.get("seconds"), "reused": result["reused"],
            "continuations": cont,
        }

    def sensitivity(self, phase: Phase, n_groups: int = 6) -> list[dict]:
        """Which layers hurt: the base with only one group of layers taken from the phase's quantized model, for
        n_groups contiguous groups of layers (the phase must have been evaluated or is quantized now)."""
        from .workbook import run_phase
        path = run_phase(self.ckpt, phase, self.work_dir / "trained")["path"]
        q = load_transformer(path, dtype=torch.float32)
        rows = kl_by_layer_group(self.base, q, self.tokens, self.context,
                                 default_layer_groups(self.base.cfg, n_groups), base_out=self.base_out)
        return [dict({k: v for k, v in r.items() if k != "linears"}, phase=phase.name) for r in rows]

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
