"""Output fidelity of a quantized model against the base model: llama.cpp-style KL divergence, deterministic.

The question "how far is the quantized model from the base?" is answered on ONE fixed token matrix: a prompt
followed by frames the BASE model generated (`reference_tokens`). Both models are run on exactly that matrix
(teacher forcing: neither model's own choices ever change what the other sees), so the numbers are
deterministic and comparable across phases, like llama.cpp's `--kl-divergence` over a fixed text.

What is compared, for every slow position t >= prompt_len - 1 whose next column t+1 is a generated frame:

- slow AR: the next-token distribution the sampler actually draws from, i.e. softmax over the ALLOWED ids only
  (semantic ids + <|im_end|>, spec §8.1: every other logit gets -inf), renormalised over those ids.
  Per position: KL(base || other) in nats, and whether the two argmaxes agree (top-1 agreement).
- fast AR: teacher-forced logits for the codes of frame t+1, over the full codebook_size distribution (the fast
  logits are not biased, §8.1), for codebooks i = 1..C-1. Step 0's logits (from the hidden state alone) are
  discarded at inference and codebook 0 is the slow token, so both are excluded. Frames whose token is
  <|im_end|> are excluded too: their codes are discarded at inference (§8.4).
  **Each model feeds its fast AR with its OWN slow hidden state at t** (the quantized model never sees the
  base's hidden state). The fast numbers therefore measure the whole stack, slow errors included, as
  llama.cpp's KL measures the whole network; `kl_by_layer_group` separates the contributions.

A plain text LM (`fishlab.model.textlm.TextLM`, the trained proxy model) goes through the same code: its matrix
is [B, T] token ids (e.g. B chunks of evaluation text), every position t >= prompt_len - 1 of every row is
compared over the FULL vocabulary (llama.cpp's `--kl-divergence`: the first prompt_len tokens of a chunk are
context only), and there is no fast AR. For both models the numbers follow llama.cpp's definitions: per-position
KL(base || other) mean / median / p99 / max, top-1 agreement, and ln(PPL_other / PPL_base) = the mean over
positions of (NLL_other - NLL_base) of the token that actually comes next.

All probability math is done in float64 on logits upcast from the model dtype (bf16 / fp32 models alike);
per-position KLs are clamped at 0 (rounding can only make a true 0 a -1e-17). A model compared with itself
gives exactly KL 0 and agreement 1.0 (identical logits give identical log-probabilities, and every term is 0).
Percentiles are linear interpolation between order statistics (numpy's default).

API:
- `reference_tokens(base, prompt, max_new_tokens, seed=0)` -> (tokens [C+1, P+N], P): the fixed matrix.
- `teacher_forced_kl(base, other, tokens, prompt_len)` -> dict of plain floats and per-codebook lists.
- `fidelity_report(base, other, tokens, prompt_len)` -> the dict a phase report / JSON holds.
- `kl_by_layer_group(base, quantized, tokens, prompt_len, groups=4)` -> "which layers hurt": one row per group
  of quantized linears, from a hybrid = base with only that group's linears taken from the quantized model.
- `restricted_log_softmax`, `kl_rows`, `percentile`: the small pieces, exposed for tests.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model.dualar import DualARTransformer, linear_names, replace_linears

__all__ = ["allowed_ids", "restricted_log_softmax", "kl_rows", "percentile", "reference_tokens",
           "ModelOutputs", "model_outputs", "compare_outputs", "teacher_forced_kl", "fidelity_report",
           "default_layer_groups", "quantized_linear_names", "swapped_linears", "kl_by_layer_group",
           "METHOD_NOTE", "TEXT_METHOD_NOTE"]

METHOD_NOTE = ("Teacher-forced on prompt + base-generated frames; slow: KL(base||quantized) of the softmax "
               "restricted to semantic ids + <|im_end|>; fast: codebooks 1..C-1 over the full codebook, each "
               "model using its own slow hidden state (whole-stack error, as llama.cpp's KL); nats.")
TEXT_METHOD_NOTE = ("Teacher-forced on chunks of evaluation text, llama.cpp --kl-divergence style: the first half "
                    "of each chunk is context, every later position is scored; KL(base||quantized) over the full "
                    "vocabulary, top-1 agreement, ln(PPL_q/PPL_base); nats.")
MATH_DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------------

def _is_text_lm(model_or_cfg) -> bool:
    from .config import TextLMConfig
    return isinstance(getattr(model_or_cfg, "cfg", model_or_cfg), TextLMConfig)


def allowed_ids(model_or_cfg) -> Tensor | None:
    """The ids the slow sampler can emit (§8.1): semantic_begin..semantic_end (inclusive), then <|im_end|>.
    None for a text LM: its whole vocabulary is compared."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if _is_text_lm(cfg):
        return None
    ids = list(range(cfg.semantic_begin_id, cfg.semantic_end_id + 1))
    if not cfg.semantic_begin_id <= cfg.eos_token_id <= cfg.semantic_end_id:
        ids.append(cfg.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def restricted_log_softmax(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """log-probabilities over the allowed ids only: log_softmax(logits[..., allowed]) in float64, i.e. the
    distribution of softmax(logits + bias) with bias = 0 at allowed ids and -inf elsewhere, renormalised over
    the allowed ids. Returns [..., len(allowed)] in allowed's order (allowed=None: the full vocabulary)."""
    if allowed is not None:
        logits = logits.index_select(-1, allowed.to(logits.device))
    return F.log_softmax(logits.to(MATH_DTYPE), dim=-1)


KL_CHUNK = 1 << 22          # values per block in kl_rows (32 MB of float64 temporaries)


def kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) over the last dim, from log-probabilities (float64).
    Terms with p_j = 0 count 0 (also where log q_j = -inf); a p_j > 0 with q_j = 0 gives +inf. Clamped at 0
    (only rounding can make a KL negative). Computed in blocks of rows, so full-vocabulary rows of a text LM
    need no more than a few blocks of temporaries."""
    lead, V = logp.shape[:-1], logp.size(-1)
    lp, lq = logp.reshape(-1, V), logq.reshape(-1, V)
    out = torch.empty(lp.size(0), dtype=MATH_DTYPE, device=lp.device)
    step = max(1, KL_CHUNK // max(1, V))
    zero = torch.zeros((), dtype=MATH_DTYPE, device=lp.device)
    for i in range(0, lp.size(0), step):
        a, b = lp[i:i + step].to(MATH_DTYPE), lq[i:i + step].to(MATH_DTYPE)
        p = a.exp()
        out[i:i + step] = torch.where(p > 0, p * (a - b), zero).sum(-1)
    return out.clamp_min(0.0).reshape(lead)


def percentile(x: Tensor, q: float) -> float:
    """The q-th percentile (0..100) of the values of x, linear interpolation between order statistics (numpy's
    default 'linear' method); nan for an empty tensor. No size limit (unlike torch.quantile)."""
    v = x.reshape(-1).to(MATH_DTYPE)
    n = v.numel()
    if n == 0:
        return math.nan
    v = torch.sort(v).values
    pos = (n - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = float(v[lo]), float(v[hi])
    return a if frac == 0 or a == b else a + (b - a) * frac


def _mean(x: Tensor) -> float:
    return float(x.to(MATH_DTYPE).mean()) if x.numel() else math.nan


# ----------------------------------------------------------------------------------------------------
# the fixed token matrix
# ----------------------------------------------------------------------------------------------------

def reference_tokens(base: DualARTransformer, prompt: Tensor, max_new_tokens: int, seed: int | None = 0,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None
                     ) -> tuple[Tensor, int]:
    """prompt [C+1, P] + frames the BASE model generates -> (tokens [C+1, P+N], P).

    seed=None: greedy (`generate_greedy`); else `generate_sampled` with this seed and the API defaults (or the
    given temperature / top_p / top_k). Deterministic on one device and torch version either way."""
    from . import spec
    from .generate import generate_greedy, generate_sampled
    prompt = prompt.to(base.device, torch.long)
    if seed is None:
        frames = generate_greedy(base, prompt, max_new_tokens)
    else:
        frames = generate_sampled(base, prompt, max_new_tokens,
                                  temperature=spec.API_TEMPERATURE if temperature is None else temperature,
                                  top_p=spec.API_TOP_P if top_p is None else top_p,
                                  top_k=spec.DEFAULT_TOP_K if top_k is None else top_k, seed=seed)
    return torch.cat([prompt, frames.to(prompt.device)], dim=1), prompt.size(1)


# ----------------------------------------------------------------------------------------------------
# one model's outputs on the matrix, and the comparison of two
# ----------------------------------------------------------------------------------------------------

@dataclass
class ModelOutputs:
    """What one model says on the matrix, already reduced to what is compared (float64 log-probabilities).

    slow_logp [N, A]: restricted log-softmax at positions prompt_len-1 .. T-2 (A = allowed ids; a text LM: the
    whole vocabulary, N = positions of every row); slow_nll [N]: -log p of the token that actually comes next;
    fast_logp [M, C-1, codebook]: log-softmax of the teacher-forced fast logits, codebooks 1..C-1, for the
    M of those N positions whose next frame is semantic (None for a text LM)."""
    slow_logp: Tensor
    fast_logp: Tensor | None
    slow_nll: Tensor | None = None


def _check_matrix(model, tokens: Tensor, prompt_len: int) -> None:
    cfg = model.cfg
    if _is_text_lm(cfg):
        if tokens.dim() != 2:
            raise ValueError(f"a text LM's tokens must be [B, T] ids, got {tuple(tokens.shape)}")
    elif tokens.dim() != 2 or tokens.size(0) != cfg.num_codebooks + 1:
        raise ValueError(f"tokens must be [num_codebooks+1={cfg.num_codebooks + 1}, T], got {tuple(tokens.shape)}")
    if not 1 <= prompt_len < tokens.size(1):
        raise ValueError(f"prompt_len {prompt_len} must satisfy 1 <= prompt_len < T = {tokens.size(1)} "
                         "(at least one generated frame after the prompt)")


def _next_nll(logp: Tensor, nxt: Tensor, allowed: Tensor | None) -> Tensor:
    """-log p(next token) from rows of log-probabilities over `allowed` (None: over the vocabulary); NaN where
    the next token is not an allowed id (a hand-made matrix; generated frames never hold one)."""
    nxt = nxt.cpu()
    if allowed is not None:
        where = torch.full((int(allowed.max()) + 1,), -1, dtype=torch.long)
        where[allowed] = torch.arange(allowed.numel())
        inside = (nxt >= 0) & (nxt < where.numel())
        nxt = torch.where(inside, where[nxt.clamp(0, where.numel() - 1)], -1)
    ok = nxt >= 0
    nll = -logp.gather(-1, nxt.clamp_min(0).to(logp.device)[:, None])[:, 0]
    return torch.where(ok.to(nll.device), nll, torch.full_like(nll, math.nan))


@torch.inference_mode()
def _text_lm_outputs(model, tokens: Tensor, prompt_len: int, batch: int = 4) -> ModelOutputs:
    """A text LM on rows of token ids, `batch` rows at a time: full-vocabulary log-softmax at positions
    prompt_len-1 .. T-2 of every row (row-major), and the NLL of each row's next token."""
    tokens = tokens.to(model.device, torch.long)
    parts, nll = [], []
    for i in range(0, tokens.size(0), batch):
        rows = tokens[i:i + batch]
        logits = model(rows[:, :-1]).logits[:, prompt_len - 1:]
        lp = restricted_log_softmax(logits, None).reshape(-1, logits.size(-1))
        parts.append(lp.cpu())
        nll.append(_next_nll(lp, rows[:, prompt_len:].reshape(-1), None).cpu())
    return ModelOutputs(torch.cat(parts), None, torch.cat(nll))


def _fast_rows(model: DualARTransformer, tokens: Tensor, prompt_len: int) -> Tensor:
    """Indices (into the N compared positions) whose next frame is semantic: the frames whose codes count."""
    cfg = model.cfg
    nxt = tokens[0, prompt_len:]
    return ((nxt >= cfg.semantic_begin_id) & (nxt <= cfg.semantic_end_id)).nonzero().reshape(-1)


@torch.inference_mode()
def model_outputs(model: DualARTransformer, tokens: Tensor, prompt_len: int, fast_batch: int = 256
                  ) -> ModelOutputs:
    """Run `model` on tokens[:, :T-1] (no KV cache, inference embedding, every position), keep positions
    prompt_len-1 .. T-2; then the teacher-forced fast AR on its own hidden states for the semantic next frames,
    `fast_batch` frames at a time. A text LM: tokens [B, T], every row (see the module docstring)."""
    _check_matrix(model, tokens, prompt_len)
    if _is_text_lm(model):
        return _text_lm_outputs(model, tokens, prompt_len)
    cfg = model.cfg
    tokens = tokens.to(model.device, torch.long)
    out = model.forward_slow(tokens[:, :-1], return_all=True)
    sl = slice(prompt_len - 1, tokens.size(1) - 1)
    allowed = allowed_ids(cfg)
    slow_logp = restricted_log_softmax(out.logits[sl], allowed)
    slow_nll = _next_nll(slow_logp, tokens[0, prompt_len:], allowed)
    rows = _fast_rows(model, tokens, prompt_len).to(model.device)
    hidden = out.hidden[sl].index_select(0, rows)
    codes = tokens[1:, prompt_len:].t().index_select(0, rows)             # [M, C] codes of the next frames
    parts = []
    for i in range(0, rows.numel(), fast_batch):
        lg = model.fast_logits_teacher_forced(hidden[i:i + fast_batch], codes[i:i + fast_batch])
        parts.append(F.log_softmax(lg[:, 1:].to(MATH_DTYPE), dim=-1))     # drop step 0 (discarded at inference)
    fast_logp = torch.cat(parts) if parts else torch.empty(0, cfg.num_codebooks - 1, cfg.codebook_size,
                                                           dtype=MATH_DTYPE, device=model.device)
    return ModelOutputs(slow_logp.cpu(), fast_logp.cpu(), slow_nll.cpu())


def _shape(t: Tensor | None):
    return None if t is None else tuple(t.shape)


def compare_outputs(base: ModelOutputs, other: ModelOutputs) -> dict:
    """The KL / agreement numbers of `teacher_forced_kl` from two models' outputs (plain floats and lists).
    No fast_* keys when the models have no fast AR (a text LM)."""
    if _shape(base.slow_logp) != _shape(other.slow_logp) or _shape(base.fast_logp) != _shape(other.fast_logp):
        raise ValueError("outputs were computed on different token matrices")
    skl = kl_rows(base.slow_logp, other.slow_logp)                              # [N]
    stop = (base.slow_logp.argmax(-1) == other.slow_logp.argmax(-1)).to(MATH_DTYPE)
    slow = {
        "slow_kl_mean": _mean(skl),
        "slow_kl_median": percentile(skl, 50),
        "slow_kl_p99": percentile(skl, 99),
        "slow_kl_max": float(skl.max()) if skl.numel() else math.nan,
        "slow_top1": _mean(stop),
        "slow_positions": int(skl.numel()),
    }
    if base.slow_nll is not None and other.slow_nll is not None:
        ok = base.slow_nll.isfinite() & other.slow_nll.isfinite()
        nb, no = _mean(base.slow_nll[ok]), _mean(other.slow_nll[ok])
        slow.update(slow_ln_ppl_ratio=no - nb, slow_ppl_base=math.exp(nb), slow_ppl=math.exp(no))
    if base.fast_logp is None:
        return slow
    fkl = kl_rows(base.fast_logp, other.fast_logp)                              # [M, C-1]
    ftop = (base.fast_logp.argmax(-1) == other.fast_logp.argmax(-1)).to(MATH_DTYPE)
    n_cb = base.fast_logp.size(1)
    return {
        **slow,
        "fast_kl_mean": _mean(fkl),
        "fast_kl_p99": percentile(fkl, 99),
        "fast_kl_max": float(fkl.max()) if fkl.numel() else math.nan,
        "fast_top1": _mean(ftop),
        "fast_frames": int(fkl.size(0)),
        "fast_codebooks": list(range(1, n_cb + 1)),
        "fast_kl_mean_by_codebook": [_mean(fkl[:, i]) for i in range(n_cb)],
        "fast_kl_p99_by_codebook": [percentile(fkl[:, i], 99) for i in range(n_cb)],
        "fast_top1_by_codebook": [_mean(ftop[:, i]) for i in range(n_cb)],
    }


def teacher_forced_kl(base: DualARTransformer, other: DualARTransformer, tokens: Tensor, prompt_len: int,
                      base_out: ModelOutputs | None = None) -> dict:
    """KL(base || other) and top-1 agreement of the slow AR (restricted to semantic ids + <|im_end|>) and the
    fast AR (codebooks 1..C-1, full codebook, each model on its own hidden state), teacher-forced on the same
    matrix `tokens` [C+1, T] (prompt of `prompt_len` columns, then base-generated frames). See the module
    docstring. Keys: slow_kl_mean, slow_kl_median, slow_kl_p99, slow_kl_max, slow_top1, slow_positions,
    slow_ln_ppl_ratio, slow_ppl_base, slow_ppl, and (not for a text LM) fast_kl_mean, fast_kl_p99, fast_kl_max,
    fast_top1, fast_frames, fast_codebooks [1..C-1], fast_kl_mean_by_codebook, fast_kl_p99_by_codebook,
    fast_top1_by_codebook (lists of length C-1).

    base_out: `model_outputs(base, tokens, prompt_len)` computed once, to compare several models with one base
    run (it must come from the same base and matrix)."""
    if base_out is None:
        base_out = model_outputs(base, tokens, prompt_len)
    return compare_outputs(base_out, model_outputs(other, tokens, prompt_len))


def fidelity_report(base: DualARTransformer, other: DualARTransformer, tokens: Tensor, prompt_len: int,
                    base_out: ModelOutputs | None = None) -> dict:
    """The fidelity block of a phase report / JSON: `teacher_forced_kl`'s numbers at the top level (slow_kl_mean,
    slow_kl_p99, slow_top1, fast_kl_mean, fast_top1, ...), plus fast_per_codebook = [{codebook, kl_mean,
    kl_p99, top1}, ...] for tables, the matrix size and the method in words. base_out: see `teacher_forced_kl`."""
    r = teacher_forced_kl(base, other, tokens, prompt_len, base_out)
    dtypes = dict(base_dtype=str(base.dtype).replace("torch.", ""), other_dtype=str(other.dtype).replace("torch.", ""))
    if _is_text_lm(base):
        r.update(rows=int(tokens.size(0)), context=int(prompt_len), row_tokens=int(tokens.size(1)), **dtypes,
                 method=TEXT_METHOD_NOTE)
        return r
    r["fast_per_codebook"] = [{"codebook": c, "kl_mean": m, "kl_p99": p, "top1": a} for c, m, p, a in zip(
        r["fast_codebooks"], r["fast_kl_mean_by_codebook"], r["fast_kl_p99_by_codebook"], r["fast_top1_by_codebook"])]
    r.update(prompt_len=int(prompt_len), generated_frames=int(tokens.size(1) - prompt_len), **dtypes,
             method=METHOD_NOTE)
    return r


# ----------------------------------------------------------------------------------------------------
# which layers hurt
# ----------------------------------------------------------------------------------------------------

GroupSpec = Union[int, Sequence[Tuple[str, Sequence[str]]], Mapping[str, Sequence[str]]]


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def default_layer_groups(cfg, n_slow_groups: int = 4) -> list[tuple[str, list[str]]]:
    """[(group name, linear-name prefixes)]: the slow layers in `n_slow_groups` contiguous groups as even as
    possible ("slow 0-8", "slow 9-17", ... for 36 layers; "slow 3" for a one-layer group), then "fast" (fast
    layers + fast_project_in) and "fast_output"."""
    n = cfg.n_layer
    k = max(1, min(int(n_slow_groups), n))
    groups = []
    bounds = [round(i * n / k) for i in range(k + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            groups.append((f"slow {_span(lo, hi - 1)}", [f"layers.{i}." for i in range(lo, hi)]))
    if _is_text_lm(cfg):
        return groups
    groups.append(("fast", ["fast_layers.", "fast_project_in"]))
    groups.append(("fast_output", ["fast_output"]))
    return groups


def _in_group(name: str, prefixes: Sequence[str]) -> bool:
    """name is one of the prefixes, or lies under one ("layers.1." / "fast_layers" match their submodules)."""
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def quantized_linear_names(base: DualARTransformer, other: DualARTransformer) -> list[str]:
    """Internal names of the linears where `other` differs from `base`: a module that is not an nn.Linear (a
    packed QuantizedLinear), or an nn.Linear whose weight differs (a model built from dequantized weights)."""
    out = []
    for name in linear_names(base):
        m = other.get_submodule(name)
        if not isinstance(m, nn.Linear):
            out.append(name)
            continue
        w0 = base.get_submodule(name).weight
        if m.weight.shape != w0.shape or not torch.equal(m.weight.to(w0.dtype), w0):
            out.append(name)
    return out


@contextlib.contextmanager
def swapped_linears(model: nn.Module, donor: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Temporarily put donor's modules at `names` into model (shared, not copied); restored on exit."""
    saved: dict[str, nn.Module] = {}

    def take(name: str, old: nn.Module) -> nn.Module:
        saved[name] = old
        return donor.get_submodule(name)

    replace_linears(model, take, names=list(names))
    try:
        yield model
    finally:
        replace_linears(model, lambda name, old: saved[name], names=list(saved))


def _as_model(m, dtype: torch.dtype | None, device) -> nn.Module:
    if isinstance(m, nn.Module):                 # a DualARTransformer or a TextLM
        return m
    from .model.load import load_transformer
    return load_transformer(Path(m), device=device, dtype=dtype)


def _normalise_groups(groups, cfg) -> list[tuple[str, list[str]]]:
    if groups is None or isinstance(groups, int):
        return default_layer_groups(cfg, 4 if groups is None else groups)
    items = groups.items() if isinstance(groups, Mapping) else groups
    return [(str(n), [p] if isinstance(p, str) else list(p)) for n, p in items]


def kl_by_layer_group(base, quantized, tokens: Tensor, prompt_len: int, groups: GroupSpec | None = None,
                      dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                      include_all: bool = False, base_out: ModelOutputs | None = None) -> list[dict]:
    """Which layers hurt: for each group of linears, a hybrid = base with ONLY that group's quantized linears
    swapped in (the quantized model's own modules, shared; the base is restored afterwards), compared with the
    base by `teacher_forced_kl`.

    base / quantized: a loaded model or a checkpoint directory (loaded once, with `dtype` - float32 by
    default, so only the quantization differs - on `device`; a loaded model is used as it is, and both must
    then have the same dtype). groups: None / an int = `default_layer_groups(cfg, n)` (4 slow groups, "fast",
    "fast_output"); or [(name, [linear-name prefixes])] / {name: prefixes}. Groups with no quantized linear
    are skipped. The base outputs are computed once. include_all appends a row "all" (every quantized linear:
    the full quantized model's numbers, for reference). base_out: the base's `model_outputs` on this matrix,
    if already computed.

    Returns [{group, linears (names), n_linears, slow_kl_mean, slow_kl_p99, slow_top1, fast_kl_mean,
    fast_kl_p99, fast_top1, fast_kl_mean_by_codebook}] in group order. The slow numbers of a "fast" group are
    exactly 0 (its linears never touch the slow AR)."""
    base_m = _as_model(base, dtype, device)
    q_m = _as_model(quantized, dtype, device)
    if base_m is q_m:
        raise ValueError("base and quantized are the same model object")
    if base_m.dtype != q_m.dtype:
        raise ValueError(f"base ({base_m.dtype}) and quantized ({q_m.dtype}) models must have the same dtype "
                         "for their linears to be swapped")
    qnames = quantized_linear_names(base_m, q_m)
    if base_out is None:
        base_out = model_outputs(base_m, tokens, prompt_len)
    rows = []
    plan = [(n, [q for q in qnames if _in_group(q, p)]) for n, p in _normalise_groups(groups, base_m.cfg)]
    if include_all:
        plan.append(("all", list(qnames)))
    keys = ("slow_kl_mean", "slow_kl_p99", "slow_top1", "slow_ln_ppl_ratio", "fast_kl_mean", "fast_kl_p99",
            "fast_top1", "fast_kl_mean_by_codebook")
    for name, names in plan:
        if not names:
            continue
        with swapped_linears(base_m, q_m, names):
            r = compare_outputs(base_out, model_outputs(base_m, tokens, prompt_len))
        rows.append({"group": name, "linears": names, "n_linears": len(names), **{k: r[k] for k in keys if k in r}})
    return rows


# ----------------------------------------------------------------------------------------------------
# one model at a time: the base model's outputs cached on disk
# ----------------------------------------------------------------------------------------------------
# On real weights a bf16 base (9 GB) and a quantized model never need to be resident together: the base's
# teacher-forced outputs on the fixed matrix are computed once (base model loaded alone, then freed) and kept
# as a safetensors file keyed by a digest of the base checkpoint and the matrix; the phase model is then loaded
# alone and compared with them. Layer groups swap linears read straight from the quantized checkpoint into the
# base model, one group at a time (`kl_by_layer_group_from_checkpoint`).

OUTPUTS_FORMAT = "fishlab ModelOutputs v1"


def outputs_digest(ckpt_dir: str | Path, tokens: Tensor, prompt_len: int, dtype: torch.dtype | str,
                   device: torch.device | str = "cpu") -> str:
    """sha256 over what a model's outputs on the matrix depend on: the checkpoint (config.json's bytes, every
    weight file's name, size and mtime), the token matrix, prompt_len, the dtype, the device type and the torch
    version. A changed, replaced or copied checkpoint gives a new digest (a cache miss, never a stale hit)."""
    import hashlib
    from . import spec
    d = Path(ckpt_dir).resolve()
    h = hashlib.sha256(OUTPUTS_FORMAT.encode())
    h.update((d / spec.CONFIG_FILE).read_bytes())
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    t = tokens.detach().to("cpu", torch.long).contiguous()
    h.update(repr(tuple(t.shape)).encode() + t.numpy().tobytes())
    dt = str(dtype).replace("torch.", "")
    h.update(f"{int(prompt_len)}:{dt}:{torch.device(device).type}:{torch.__version__}".encode())
    return h.hexdigest()


def save_model_outputs(path: str | Path, outputs: ModelOutputs, digest: str, meta: Mapping[str, str] | None = None
                       ) -> Path:
    """ModelOutputs -> one safetensors file (atomic), float64 as computed (fast_logp / slow_nll only when
    present), the digest in its metadata."""
    from safetensors.torch import save_file
    from .io import atomic_path
    path = Path(path)
    md = {"format": OUTPUTS_FORMAT, "digest": digest, **{str(k): str(v) for k, v in (meta or {}).items()}}
    tensors = {k: getattr(outputs, k).contiguous() for k in ("slow_logp", "fast_logp", "slow_nll")
               if getattr(outputs, k) is not None}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)
    return path


def load_model_outputs(path: str | Path, digest: str | None = None) -> ModelOutputs | None:
    """The ModelOutputs saved at `path`, or None when the file is absent or was saved under another digest."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("format") != OUTPUTS_FORMAT or (digest is not None and md.get("digest") != digest):
            return None
        keys = set(f.keys())
        get = lambda k: f.get_tensor(k) if k in keys else None  # noqa: E731
        return ModelOutputs(get("slow_logp"), get("fast_logp"), get("slow_nll"))


@dataclass
class CachedBase:
    """Stands in for the base model where only its outputs on the matrix and its dtype are needed
    (`fidelity_report(CachedBase(...), other, tokens, prompt_len, cached.outputs)`)."""
    outputs: ModelOutputs
    dtype: torch.dtype
    digest: str
    path: Path
    reused: bool
    weight_bytes: dict      # the model's `model_weight_bytes`, recorded when its outputs were computed


def cached_model_outputs(ckpt_dir: str | Path, tokens: Tensor, prompt_len: int, cache_dir: str | Path,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CachedBase:
    """The outputs of the model at `ckpt_dir` on the matrix, from `cache_dir` when computed before (same
    digest), else computed with that model loaded ALONE (freed before returning) and saved there."""
    import json
    from safetensors import safe_open
    digest = outputs_digest(ckpt_dir, tokens, prompt_len, dtype, device)
    path = Path(cache_dir) / f"outputs-{digest[:20]}.safetensors"
    out = load_model_outputs(path, digest)
    reused = out is not None
    if out is None:
        from .model.load import load_transformer, model_weight_bytes
        model = load_transformer(Path(ckpt_dir), device=device, dtype=dtype)
        out = model_outputs(model, tokens, prompt_len)
        wb = model_weight_bytes(model)
        del model
        save_model_outputs(path, out, digest, {"checkpoint": str(Path(ckpt_dir).resolve()), "prompt_len": prompt_len,
                                               "dtype": str(dtype), "weight_bytes": json.dumps(wb)})
    else:
        with safe_open(str(path), framework="pt") as f:
            wb = json.loads(f.metadata()["weight_bytes"])
    return CachedBase(out, dtype, digest, path, reused, wb)


def quantized_linears_from_checkpoint(qdir: str | Path, names: Sequence[str], device: str | torch.device,
                                      dtype: torch.dtype) -> nn.Module:
    """The QuantizedLinears of a quantized checkpoint at internal linear `names` only (their packed tensors are
    the only ones read), prepared for `dtype` on `device`, in a container addressable by those names
    (`container.get_submodule(name)`), e.g. as the donor of `swapped_linears`."""
    from .checkpoint import read_headers, read_tensor
    from .manifest import hf_to_internal
    from .quant.apply import read_quantization
    from .quant.primitives import from_description
    from .quant.qlinear import QuantizedLinear
    q = read_quantization(qdir)
    if q is None:
        raise ValueError(f"{qdir}: not a fishlab quantized checkpoint")
    infos, _ = read_headers(qdir)
    by_internal = {hf_to_internal(hf)[: -len(".weight")]: hf for hf in q["tensors"]}
    root = nn.Module()
    for name in names:
        hf = by_internal.get(name)
        if hf is None:
            raise ValueError(f"{qdir}: linear {name!r} is not quantized in this checkpoint")
        desc = q["tensors"][hf]
        zero = read_tensor(infos[hf + ".zero"]) if desc.get("zero_point") else None
        qt = from_description(desc, read_tensor(infos[hf + ".qdata"]), read_tensor(infos[hf + ".scale"]), hf,
                              zero).to(device)
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], QuantizedLinear.from_qtensor(qt, compute_dtype=dtype))
    return root


def kl_by_layer_group_from_checkpoint(base: DualARTransformer, quantized_dir: str | Path, tokens: Tensor,
                                      prompt_len: int, groups: GroupSpec | None = None,
                                      base_out: ModelOutputs | None = None) -> list[dict]:
    """`kl_by_layer_group` with only the base model resident: each group's quantized linears are read from the
    quantized checkpoint (that group's tensors only), prepared for the base's dtype and device, swapped into the
    base, measured, swapped out and freed. Same rows as `kl_by_layer_group`."""
    from .manifest import hf_to_internal
    from .quant.apply import read_quantization
    q = read_quantization(quantized_dir)
    if q is None:
        raise ValueError(f"{quantized_dir}: not a fishlab quantized checkpoint")
    qnames = [n for n in linear_names(base) if n in {hf_to_internal(k)[: -len(".weight")] for k in q["tensors"]}]
    if base_out is None:
        base_out = model_outputs(base, tokens, prompt_len)
    keys = ("slow_kl_mean", "slow_kl_p99", "slow_top1", "slow_ln_ppl_ratio", "fast_kl_mean", "fast_kl_p99",
            "fast_top1", "fast_kl_mean_by_codebook")                  # kl_by_layer_group's row keys
    rows = []
    for name, prefixes in _normalise_groups(groups, base.cfg):
        names = [n for n in qnames if _in_group(n, prefixes)]
        if not names:
            continue
        donor = quantized_linears_from_checkpoint(quantized_dir, names, base.device, base.dtype)
        with swapped_linears(base, donor, names):
            r = compare_outputs(base_out, model_outputs(base, tokens, prompt_len))
        del donor
        rows.append({"group": name, "linears": names, "n_linears": len(names), **{k: r[k] for k in keys if k in r}})
    return rows


__all__ += ["outputs_digest", "save_model_outputs", "load_model_outputs", "CachedBase", "cached_model_outputs",
            "quantized_linears_from_checkpoint", "kl_by_layer_group_from_checkpoint"]
