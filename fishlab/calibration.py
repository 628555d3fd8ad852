"""Calibration for the quantizers that need inputs (GPTQ): per-linear input Hessians, captured block by block.

The standard sequential scheme, with bounded memory: the calibration inputs are embedded once, then the stack is
run ONE BLOCK AT A TIME: block i's weights are read from the checkpoint (nothing else of the model is resident),
its forward over the calibration activations accumulates ``H = 2 X^T X / n`` for each of its linears (forward
pre-hooks), its planned linears are quantized (GPTQ with those Hessians, the others by their own quantizer), and
the QUANTIZED block's outputs become block i+1's inputs, so every layer is calibrated on what the quantized model
below it really feeds it. Resident at once: one block in float32, the activations of the calibration set
([positions, dim] float32: 4096 x 2560 x 4 B = 42 MB at S2 Pro size), the Hessians of one block (w2's is
[9728, 9728] float32, 0.38 GB) and the packed results of the GPTQ linears until the writer streams them out.

Calibration inputs (disjoint from every evaluation text):
- a text LM (the trained proxy model): chunks of fishlab.textdata's calibration text (`textdata.text
  ("calibration")`, topics the evaluation never reads), tokenized by the checkpoint's tokenizer;
- S2 Pro (DualAR): the base model's own teacher-forced runs: TTS prompts of calibration-text sentences plus the
  codes the base model generates for them (`fidelity.reference_tokens`, greedy). Generating needs the base model
  loaded once, before the block-by-block pass (it is freed before that pass starts).

The phase's `calibration:` mapping sets the amount: `tokens` (positions in all, default below), `ctx` (positions
per text chunk, or generated frames per S2 Pro prompt), `seed` (S2 Pro: sampling seed; absent = greedy).
Only the slow-AR stack (every linear of a text LM) is calibrated this way; GPTQ on fast-AR linears is refused
with a message (keep them, or give them another quantizer through an override).
"""
from __future__ import annotations

import logging
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from . import textdata
from .checkpoint import read_tensor, validate_transformer
from .config import TextLMConfig, load_config
from .manifest import transformer_manifest
from .phases import Phase
from .quant.primitives import QTensor, dequantize_tensor

log = logging.getLogger("fishlab.calibration")

DEFAULTS = {"text_lm": {"tokens": 4096, "ctx": 512}, "dualar": {"tokens": 1024, "ctx": 64}}
BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class CalibrationError(RuntimeError):
    """Calibration cannot run as asked (the message says what to change)."""


# ----------------------------------------------------------------------------------------------------
# Hessians of a module's linears
# ----------------------------------------------------------------------------------------------------

class HessianCollector:
    """``H = 2 X^T X / n`` of the inputs each named nn.Linear of `module` sees while the context is open
    (float32 sums on the inputs' device; n counts input rows)."""

    def __init__(self, module: nn.Module, names):
        self.module, self.names = module, list(names)
        self.sums: dict[str, Tensor] = {}
        self.n: dict[str, int] = {}

    @contextmanager
    def collecting(self):
        handles = [self.module.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = self.sums.get(name)
            self.sums[name] = x.t() @ x if s is None else s.addmm_(x.t(), x)
            self.n[name] = self.n.get(name, 0) + x.shape[0]
        return hook

    def hessian(self, name: str) -> Tensor:
        if name not in self.sums:
            raise CalibrationError(f"{name}: saw no calibration input")
        return self.sums[name] * (2.0 / self.n[name])


# ----------------------------------------------------------------------------------------------------
# calibration inputs
# ----------------------------------------------------------------------------------------------------

def _amount(cfg, calibration: dict) -> tuple[int, int]:
    d = DEFAULTS["text_lm" if isinstance(cfg, TextLMConfig) else "dualar"]
    return int(calibration.get("tokens", d["tokens"])), int(calibration.get("ctx", d["ctx"]))


def text_lm_tokens(ckpt: str | Path, calibration: dict | None = None) -> Tensor:
    """[n, ctx] token chunks of the calibration text (never the evaluation text) for a text-LM checkpoint."""
    from tokenizers import Tokenizer
    from . import spec
    cfg = load_config(ckpt).transformer
    tokens, ctx = _amount(cfg, calibration or {})
    tok = Tokenizer.from_file(str(Path(ckpt) / spec.TOKENIZER_FILE))
    ids = tok.encode(textdata.text("calibration")).ids
    bos = cfg.bos_token_id if cfg.add_bos_token else None
    return textdata.token_chunks(ids, max(1, math.ceil(tokens / ctx)), ctx, bos)


def calibration_sentences(n: int) -> list[str]:
    """The first n sentences of 40-200 characters of the calibration text (the TTS prompts' texts)."""
    text = re.sub(r"\s+", " ", textdata.text("calibration"))
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 200 and "*" not in s]
    if len(out) < n:
        raise CalibrationError(f"the calibration text has only {len(out)} usable sentences, {n} asked")
    return out[:n]


def dualar_tokens(ckpt: str | Path, calibration: dict | None = None, device=None) -> list[Tensor]:
    """S2 Pro calibration matrices [C+1, P+N]: a TTS prompt of a calibration sentence + the N frames the base
    model generates for it (teacher-forced afterwards), until `tokens` positions are reached."""
    from .fidelity import reference_tokens
    from .model import load_transformer
    from .prompt import build_tts_prompt
    from .tokenizer import load_tokenizer
    cal = calibration or {}
    cfg = load_config(ckpt).transformer
    tokens, frames = _amount(cfg, cal)
    base = load_transformer(ckpt, device=device or "cpu")
    tok = load_tokenizer(ckpt)
    out, total = [], 0
    try:
        for text in calibration_sentences(64):
            prompt = build_tts_prompt(tok, text, cfg.num_codebooks)
            seq, _ = reference_tokens(base, prompt, frames, seed=cal.get("seed"))
            out.append(seq.cpu())
            total += seq.shape[1]
            if total >= tokens:
                break
    finally:
        del base
    return out


# ----------------------------------------------------------------------------------------------------
# the block-by-block pass
# ----------------------------------------------------------------------------------------------------

def _block(cfg, state: dict, device) -> nn.Module:
    from .model.dualar import TransformerBlock
    b = TransformerBlock(cfg.dim, cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.intermediate_size, cfg.norm_eps,
                         cfg.attention_qk_norm, "sdpa")
    b.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return b.to(device).requires_grad_(False)


def _embedded(ckpt: Path, cfg, infos, inputs, device) -> list[Tensor]:
    """The calibration inputs as float32 [1 or B, T, dim] slow-AR input activations."""
    from . import spec
    E = read_tensor(infos[spec.HF_TEXT_PREFIX + "embeddings.weight"]).to(device, torch.float32)
    if isinstance(cfg, TextLMConfig):
        return [torch.nn.functional.embedding(inputs.to(device), E)]
    from .model.dualar import DualARTransformer
    with torch.device("meta"):
        shell = DualARTransformer(cfg)
    shell.embeddings = nn.Embedding.from_pretrained(E)
    cb = read_tensor(infos[spec.HF_AUDIO_PREFIX + "codebook_embeddings.weight"]).to(device, torch.float32)
    shell.codebook_embeddings = nn.Embedding.from_pretrained(cb)
    with torch.no_grad():
        return [shell.embed(t.to(device))[None] for t in inputs]


def _rope(cfg, T: int, device):
    from .model.dualar import TORCH_DTYPES, AttnPlan, rope_table
    pos = torch.arange(T, device=device)
    dt = TORCH_DTYPES[cfg.rope_dtype] if isinstance(cfg, TextLMConfig) else torch.bfloat16
    return rope_table(pos, cfg.head_dim, cfg.rope_base, dt), AttnPlan.build(pos, use_cache=False)


def calibrate_and_quantize(src: str | Path, per_tensor: dict[str, Phase], device=None, progress: bool = False,
                           inputs=None) -> tuple[dict[str, QTensor], dict]:
    """The QTensors of every GPTQ linear in `per_tensor` ({HF name: its phase}, as quant.apply.tensor_plan
    gives), computed by the sequential block-by-block pass over `src` on `device` (None: CPU); and what was done
    (calibration set, seconds, peak Hessian bytes) for quantization.json. `inputs` replaces the calibration
    inputs (tests)."""
    from . import spec
    from .quant.apply import scheme_of
    from .quant.methods import quantize_weight
    src = Path(src)
    device = torch.device(device or "cpu")
    cfg_t, infos = validate_transformer(src)
    specs = {s.name: s for s in transformer_manifest(cfg_t)}
    gptq = {n for n, tp in per_tensor.items() if tp.quantizer == "gptq"}
    outside = sorted(specs[n].internal.removesuffix(".weight") for n in gptq if specs[n].component != "slow_ar")
    if outside:
        raise CalibrationError(f"gptq is calibrated on the slow-AR stack only; {outside[0]} (and {len(outside) - 1} "
                               f"more) lie outside it: keep them or give them another quantizer in an override")
    cal = next(iter(per_tensor[n].calibration for n in sorted(gptq)), {})
    t0 = time.perf_counter()
    text_lm = isinstance(cfg_t, TextLMConfig)
    if inputs is None:
        inputs = text_lm_tokens(src, cal) if text_lm else dualar_tokens(src, cal, device)
    xs = _embedded(src, cfg_t, infos, inputs, device)
    n_pos = sum(x.shape[0] * x.shape[1] for x in xs)
    last = max((specs[n].layer for n in gptq), default=-1)
    out: dict[str, QTensor] = {}
    peak_h = 0
    P = spec.HF_TEXT_PREFIX
    for i in range(last + 1):
        prefix = f"{P}layers.{i}."
        state = {n[len(prefix):]: read_tensor(infos[n]) for n in specs if n.startswith(prefix)}
        block = _block(cfg_t, state, device)
        del state
        planned = [ln for ln in BLOCK_LINEARS if prefix + ln + ".weight" in per_tensor]
        want_h = [ln for ln in planned if prefix + ln + ".weight" in gptq]
        hc = HessianCollector(block, want_h)
        with torch.no_grad(), hc.collecting():
            for x in xs:
                block(x, *_rope(cfg_t, x.shape[1], device))
        peak_h = max(peak_h, sum(h.numel() * 4 for h in hc.sums.values()))
        for ln in planned:                               # quantize, and run the block with its quantized weights
            name = prefix + ln + ".weight"
            tp = per_tensor[name]
            lin = block.get_submodule(ln)
            h = hc.hessian(ln) if ln in want_h else None
            qt = quantize_weight(name, lin.weight, scheme_of(tp), tp.quantizer, tp.quantizer_args, h)
            lin.weight.copy_(dequantize_tensor(qt, torch.float32))
            if name in gptq:
                qt.dtype = getattr(torch, infos[name].dtype)     # stored as the checkpoint's dtype says
                out[name] = qt.to("cpu")
        del hc
        with torch.no_grad():
            xs = [block(x, *_rope(cfg_t, x.shape[1], device)) for x in xs]
        del block
        if progress:
            log.warning("fishlab: calibrated block %d/%d (%.0f s)", i + 1, last + 1, time.perf_counter() - t0)
    info = {"set": "textdata calibration text" if text_lm else "base model's teacher-forced runs of calibration "
            "sentences", "text": textdata.text_info("calibration"), "sequences": len(inputs), "positions": n_pos,
            "device": str(device), "seconds": time.perf_counter() - t0, "peak_hessian_bytes": peak_h,
            "blocks": last + 1}
    return out, info
