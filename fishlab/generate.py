"""Frame generation with the DualAR model (spec s2pro-model.md §6.3, §8).

Only greedy decoding (top_k = 1) is implemented: the deterministic case the golden sets pin down. The loop is
written around two replaceable functions so full sampling (§8.2 top-p / top-k / temperature, §8.3 RAS) can
be added later without touching the loop:

- `sample_slow(logits_with_bias [V], window [C+1, W] | None) -> token id` (the window is None at prefill;
  greedy ignores it);
- `sample_fast(logits [codebook_size]) -> code`.

Loop mechanics (§8.4):
1. prefill the prompt at positions 0..T-1, sample the slow token from (logits + semantic bias), run the fast
   loop -> frame f0 (never tested for <|im_end|>);
2. for n = 1 .. max_new-1: feed the previous frame at position T+n-1, sample, fast loop, append, and stop
   right after appending a frame whose token is <|im_end|>.
`generate` returns every generated frame, [C+1, N]. The codes the reference hands to the codec drop the last
frame (whether or not it is the <|im_end|> frame): that is `frames_to_codes`, applied separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .model.dualar import DualARTransformer

__all__ = ["semantic_bias", "sample_greedy", "GenerationTrace", "fast_decode", "generate", "generate_greedy",
           "frames_to_codes"]

SlowSampler = Callable[[Tensor, "Tensor | None"], Tensor]
FastSampler = Callable[[Tensor], Tensor]


def semantic_bias(model: DualARTransformer) -> Tensor:
    """[vocab] additive bias in the model dtype: 0 at semantic ids (inclusive range) and at <|im_end|>
    (eos_token_id), -inf everywhere else (§8.1)."""
    cfg = model.cfg
    bias = torch.full((cfg.vocab_size,), float("-inf"), dtype=model.dtype, device=model.device)
    bias[cfg.semantic_begin_id: cfg.semantic_end_id + 1] = 0
    bias[cfg.eos_token_id] = 0
    return bias


def sample_greedy(logits: Tensor, window: Tensor | None = None) -> Tensor:
    """top_k = 1: the argmax (ties go to the lowest index, as the reference's exponential race with top_k=1).
    Usable as both the slow and the fast sampler; `window` (RAS) is irrelevant for greedy."""
    return torch.argmax(logits, dim=-1)


@dataclass
class GenerationTrace:
    """What the loop saw, one row per generated frame: positions [N] (slow position whose output made the
    frame), slow_logits [N, vocab] (raw, no bias), slow_hidden [N, dim], fast_logits [N, C, codebook_size]
    (row 0 = step-0 logits from the hidden state, discarded by the loop; row i predicts c_i)."""
    positions: list = field(default_factory=list)
    slow_logits: list = field(default_factory=list)
    slow_hidden: list = field(default_factory=list)
    fast_logits: list = field(default_factory=list)

    def stacked(self) -> dict[str, Tensor]:
        return {"positions": torch.tensor(self.positions, dtype=torch.long),
                "slow_logits": torch.stack(self.slow_logits), "slow_hidden": torch.stack(self.slow_hidden),
                "fast_logits": torch.stack(self.fast_logits)}


def fast_decode(model: DualARTransformer, hidden: Tensor, token: Tensor,
                sample_fast: FastSampler = sample_greedy) -> tuple[Tensor, Tensor]:
    """The per-frame fast loop (§6.3) for one slow step: hidden [dim] (final-normed slow state), token (the
    sampled slow id). Returns (frame [C+1] = [token, c0, ..., c_{C-1}], fast logits [C, codebook_size])."""
    cfg = model.cfg
    C = cfg.num_codebooks
    logits = [model.fast_step(model.fast_input(hidden.reshape(1, 1, -1)), 0)[0, 0]]   # discarded
    c0 = (token - cfg.semantic_begin_id).clamp(0, cfg.codebook_size - 1)
    codes = [c0.reshape(())]
    for i in range(1, C):
        x = model.fast_embeddings(codes[-1].reshape(1, 1))
        li = model.fast_step(x, i)[0, 0]
        logits.append(li)
        codes.append(sample_fast(li).reshape(()).to(torch.long))
    frame = torch.stack([token.reshape(()).to(torch.long)] + codes)
    return frame, torch.stack(logits)


@torch.inference_mode()
def generate(model: DualARTransformer, prompt_tokens: Tensor, max_new_tokens: int,
             sample_slow: SlowSampler = sample_greedy, sample_fast: FastSampler = sample_greedy,
             return_trace: bool = False, ras_window: int = 10):
    """Generate frames after a [C+1, P] prompt. Returns frames [C+1, N] (every generated frame, including the
    last), or (frames, GenerationTrace) with return_trace.

    max_new_tokens = 0 means "until the model's context (config max_seq_len) is full"; the count is capped at
    max_seq_len - P. The slow KV cache is (re)allocated for P + max_new_tokens positions unless the model
    already holds a cache at least that long (stale slots past the current position are never read). The RAS window (§8.3) is
    kept as the reference does (decode-step frames only, shifted left each step) and passed to sample_slow.
    """
    cfg = model.cfg
    prompt = prompt_tokens.to(model.device, torch.long)
    if prompt.dim() != 2 or prompt.size(0) != cfg.num_codebooks + 1:
        raise ValueError(f"prompt must be [num_codebooks+1={cfg.num_codebooks + 1}, P], got {tuple(prompt.shape)}")
    P = prompt.size(1)
    if P >= cfg.max_seq_len:
        raise ValueError(f"prompt of {P} columns does not fit max_seq_len {cfg.max_seq_len}")
    room = cfg.max_seq_len - P
    n_max = room if max_new_tokens <= 0 else min(max_new_tokens, room)
    needed = P + n_max
    kv = model.layers[0].attention.kv_cache if len(model.layers) else None
    if model.cache_length < needed or kv is None or kv.k_cache.dtype != model.dtype:
        model.setup_caches(needed)                 # sized to this request; a big-enough cache is reused
    bias = semantic_bias(model)
    trace = GenerationTrace()

    def one_frame(out, pos: int, window: Tensor | None) -> Tensor:
        logits, hidden = out.logits.reshape(-1), out.hidden.reshape(-1)
        token = sample_slow(logits + bias, window)
        frame, fast_logits = fast_decode(model, hidden, token, sample_fast)
        if return_trace:
            trace.positions.append(pos)
            trace.slow_logits.append(logits)
            trace.slow_hidden.append(hidden)
            trace.fast_logits.append(fast_logits)
        return frame

    frames = [one_frame(model.prefill(prompt), P - 1, None)]          # prefill: no RAS window
    window = torch.zeros(cfg.num_codebooks + 1, ras_window, dtype=torch.long, device=model.device)
    for n in range(1, n_max):
        pos = P + n - 1
        frame = one_frame(model.decode_step(frames[-1], pos), pos, window)
        frames.append(frame)
        window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
        if int(frame[0]) == cfg.eos_token_id:
            break
    result = torch.stack(frames, dim=1)
    return (result, trace) if return_trace else result


def generate_greedy(model: DualARTransformer, prompt_tokens: Tensor, max_new_tokens: int,
                    return_trace: bool = False):
    """Deterministic greedy generation (top_k = 1). See `generate`."""
    return generate(model, prompt_tokens, max_new_tokens, sample_greedy, sample_greedy, return_trace)


def frames_to_codes(frames: Tensor) -> Tensor:
    """Codes for the codec from generated frames [C+1, N]: rows 1..C of every frame except the last one
    (dropped whether or not it is the <|im_end|> frame, §8.4) -> [C, N-1]."""
    codes = frames[1:, :-1]
    if codes.numel() and int(codes.min()) < 0:
        raise ValueError("negative code in generated frames")
    return codes
