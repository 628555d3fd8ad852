"""Frame generation with the DualAR model (spec s2pro-model.md §6.3, §8).

Two decoders share one loop (`generate`):
- greedy (top_k = 1, `generate_greedy`): the deterministic case the golden sets pin down;
- full sampling (`generate_sampled`): §8.2 `sample` (top-p on the untempered distribution with the crossing
  token removed, top-k, temperature after, exponential race) for the slow token with §8.3 repetition-aware
  sampling (RAS), and the same `sample` without bias or RAS for the fast codes. Randomness comes only from a
  dedicated `torch.Generator` on the model's device (never the global RNG), so on one device and torch
  version the same seed gives the same frames.

The loop takes two replaceable functions:

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

Speed: decode steps run `DualARTransformer.decode_step_static` (static shapes, the whole KV cache under a
position mask, no host synchronisation inside a step) and score only the allowed slow ids (the sliced head);
the sampler still sees a full-vocabulary vector, -inf outside the allowed ids, i.e. exactly `logits + bias`.
`compile=True` wraps the slow step and the fast step in `torch.compile(mode="reduce-overhead", fullgraph=True)`
(CUDA graphs on a GPU; two graphs, the fast one shared by every fast position); sampling and the fast
embedding lookup run between them. The loop's only host synchronisation is the <|im_end|> test once per frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import spec
from .model.dualar import DualARTransformer, _math_sdpa, allowed_slow_ids

__all__ = ["semantic_bias", "sample_greedy", "GenerationTrace", "fast_decode", "generate", "generate_greedy",
           "frames_to_codes", "SamplingParams", "check_sampling_params", "as_model_scalar", "sample", "removal_mask",
           "exponential_race",
           "make_slow_sampler", "make_fast_sampler", "make_generator", "generate_sampled", "stop_reason", "DecodeSteps",
           "COMPILE_MODE"]

COMPILE_MODE = "reduce-overhead"     # CUDA graphs on a GPU; plain inductor code on the CPU
COMPILE_CACHE_BUCKET = 256           # compiled decoding sizes the KV cache in steps of this many slots, so that
                                     # requests of similar length reuse one compiled graph

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
                sample_fast: FastSampler = sample_greedy, fast_step=None) -> tuple[Tensor, Tensor]:
    """The per-frame fast loop (§6.3) for one slow step: hidden [dim] (final-normed slow state), token (the
    sampled slow id). Returns (frame [C+1] = [token, c0, ..., c_{C-1}], fast logits [C, codebook_size]).
    fast_step(x, i) -> logits [1, 1, codebook] replaces `model.fast_step` (e.g. a compiled step)."""
    cfg = model.cfg
    C = cfg.num_codebooks
    step = fast_step or model.fast_step
    logits = [step(model.fast_input(hidden.reshape(1, 1, -1)), 0)[0, 0]]   # discarded
    c0 = (token - cfg.semantic_begin_id).clamp(0, cfg.codebook_size - 1)
    codes = [c0.reshape(())]
    for i in range(1, C):
        x = model.fast_embeddings(codes[-1].reshape(1, 1))
        li = step(x, i)[0, 0]
        logits.append(li)
        codes.append(sample_fast(li).reshape(()).to(torch.long))
    frame = torch.stack([token.reshape(()).to(torch.long)] + codes)
    return frame, torch.stack(logits)


class DecodeSteps:
    """The per-frame model calls of the decode loop, eager or compiled (`compile=True`: torch.compile with
    fullgraph=True; the compiled functions are kept on the model, so later requests reuse them):

    - `slow(column [C+1], pos [1]) -> (allowed logits [A], hidden [dim])`: `decode_step_static`;
    - `fast(x, i) -> logits [1, 1, codebook]`: the fast step at position i (compiled: `fast_step_static` with the
      position as a device tensor, so one graph serves every position).
    Sampling and the fast embedding lookup run between these calls (eager). Compiled calls each begin a CUDA
    graph step and return copies (a graph's outputs are overwritten by its next replay; the fast loop keeps
    every position's logits).
    """

    def __init__(self, model: DualARTransformer, compile: bool = False, mode: str = COMPILE_MODE):
        self.ids = allowed_slow_ids(model.cfg, model.device)
        if not compile:
            self.slow, self.fast = model.decode_step_static, model.fast_step
            return
        cache = model.__dict__.setdefault("_compiled_decode", {})
        key = (mode, str(model.device))
        if key not in cache:
            opts = dict(mode=mode, fullgraph=True)
            cache[key] = (torch.compile(model.decode_step_static, **opts),
                          torch.compile(model.fast_step_static, **opts))
        slow_c, fast_c = cache[key]
        positions = [torch.tensor([i], device=model.device) for i in range(model.cfg.num_codebooks)]
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

        def slow(column: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
            mark()
            logits, hidden = slow_c(column, pos)
            return logits.clone(), hidden.clone()

        def fast(x: Tensor, i: int) -> Tensor:
            mark()
            return fast_c(x, positions[i]).clone()

        self.slow, self.fast = slow, fast


def _full_vocab(logits: Tensor, ids: Tensor, vocab: int) -> Tensor:
    """[A] logits of the allowed ids -> [vocab], -inf elsewhere: exactly `full logits + semantic_bias` (0 at the
    allowed ids, -inf elsewhere), without scoring the other rows."""
    return torch.full((vocab,), float("-inf"), dtype=logits.dtype, device=logits.device).index_put_((ids,), logits)


@torch.inference_mode()
def generate(model: DualARTransformer, prompt_tokens: Tensor, max_new_tokens: int,
             sample_slow: SlowSampler = sample_greedy, sample_fast: FastSampler = sample_greedy,
             return_trace: bool = False, ras_window: int = 10, compile: bool = False):
    """Generate frames after a [C+1, P] prompt. Returns frames [C+1, N] (every generated frame, including the
    last), or (frames, GenerationTrace) with return_trace.

    max_new_tokens = 0 means "until the model's context (config max_seq_len) is full"; the count is capped at
    max_seq_len - P. The slow KV cache is (re)allocated for P + max_new_tokens positions (with compile=True
    rounded up to a multiple of COMPILE_CACHE_BUCKET) unless the model already holds a cache at least that long
    (stale slots past the current position are masked). The RAS window (§8.3) is kept as the reference does
    (decode-step frames only, shifted left each step) and passed to sample_slow. The slow logits the samplers
    see come from the sliced head (`allowed_only`); the trace records the full head's logits of the same hidden
    states. compile=True: see the module docstring.
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
    if compile:
        needed = min(cfg.max_seq_len, -(-needed // COMPILE_CACHE_BUCKET) * COMPILE_CACHE_BUCKET)
    kv = model.layers[0].attention.kv_cache if len(model.layers) else None
    if model.cache_length < needed or kv is None or kv.k_cache.dtype != model.dtype:
        model.setup_caches(needed)                 # sized to this request; a big-enough cache is reused
    steps = DecodeSteps(model, compile)
    model.decode_tables()                          # made eagerly, outside any compiled call
    trace = GenerationTrace()

    def one_frame(logits: Tensor, hidden: Tensor, pos: int, window: Tensor | None) -> Tensor:
        logits, hidden = logits.reshape(-1), hidden.reshape(-1)
        token = sample_slow(_full_vocab(logits, steps.ids, cfg.vocab_size), window)
        frame, fast_logits = fast_decode(model, hidden, token, sample_fast, steps.fast)
        if return_trace:
            trace.positions.append(pos)
            trace.slow_logits.append(model.slow_head(hidden, allowed_only=False))
            trace.slow_hidden.append(hidden)
            trace.fast_logits.append(fast_logits)
        return frame

    first = model.prefill(prompt, allowed_only=True)
    frames = [one_frame(first.logits, first.hidden, P - 1, None)]          # prefill: no RAS window
    window = torch.zeros(cfg.num_codebooks + 1, ras_window, dtype=torch.long, device=model.device)
    pos_t = torch.tensor([P], device=model.device)                          # advanced on the device
    for n in range(1, n_max):
        pos = P + n - 1
        with _math_sdpa():
            logits, hidden = steps.slow(frames[-1], pos_t)
        frame = one_frame(logits, hidden, pos, window)
        frames.append(frame)
        pos_t = pos_t + 1
        window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
        if int(frame[0]) == cfg.eos_token_id:      # the loop's one host synchronisation per frame
            break
    result = torch.stack(frames, dim=1)
    return (result, trace) if return_trace else result


def generate_greedy(model: DualARTransformer, prompt_tokens: Tensor, max_new_tokens: int,
                    return_trace: bool = False, compile: bool = False):
    """Deterministic greedy generation (top_k = 1). See `generate`."""
    return generate(model, prompt_tokens, max_new_tokens, sample_greedy, sample_greedy, return_trace,
                    compile=compile)


def frames_to_codes(frames: Tensor) -> Tensor:
    """Codes for the codec from generated frames [C+1, N]: rows 1..C of every frame except the last one
    (dropped whether or not it is the <|im_end|> frame, §8.4) -> [C, N-1]."""
    codes = frames[1:, :-1]
    if codes.numel() and int(codes.min()) < 0:
        raise ValueError("negative code in generated frames")
    return codes


def stop_reason(frames: Tensor, eos_token_id: int) -> str:
    """Why a `generate` call ended: "eos" when the last frame is <|im_end|> and was tested (any frame but the
    first, §8.4), else "length" (the frame budget, or the context, ran out)."""
    n = frames.size(1)
    if n >= 2 and int(frames[0, -1]) == eos_token_id:
        return "eos"
    return "length"


# ----------------------------------------------------------------------------------------------------
# full sampling (§8.2, §8.3)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """The user-facing knobs, as Python numbers (HTTP API defaults, §10). `sample` rounds temperature and
    top_p to the model dtype (bf16: 0.8 -> 0.80078125), as the reference's 0-d tensors do."""
    temperature: float = spec.API_TEMPERATURE
    top_p: float = spec.API_TOP_P
    top_k: int = spec.DEFAULT_TOP_K

    def __post_init__(self):
        check_sampling_params(self.temperature, self.top_p, self.top_k)


def check_sampling_params(temperature: float, top_p: float, top_k: int) -> None:
    """The driver's validation (§10): 0 < top_p <= 1, 0 < temperature < 2; top_k must be an int >= 1."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must satisfy 0 < top_p <= 1, got {top_p}")
    if not 0 < float(temperature) < 2:
        raise ValueError(f"temperature must satisfy 0 < temperature < 2, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")


def as_model_scalar(value: float | Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """A 0-d tensor of `dtype` (the reference passes temperature / top_p this way, so bf16 rounds them:
    0.9 -> 0.8984375, 0.8 -> 0.80078125, 0.7 -> 0.69921875, 1.0 -> 1.0)."""
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=device)


def sample(logits: Tensor, temperature: float | Tensor, top_p: float | Tensor, top_k: int,
           generator: torch.Generator | None = None) -> Tensor:
    """One token from a 1-D logit vector, exactly as §8.2, in the logits' dtype:

    1. sort descending (stable, so equal logits keep vocabulary order); 2. p = softmax(sorted), cum = cumsum(p);
    3. remove sorted position j if cum[j] > top_p or j >= top_k, position 0 always kept (the token whose mass
    first crosses top_p is itself removed; a top-1 alone above top_p survives alone); 4. removed logits -> -inf
    in vocabulary order; 5. divide by max(temperature, 1e-5) (AFTER the top-p/top-k decision); 6. softmax;
    7. exponential race: u ~ U[0,1) of the logits' dtype from `generator`, pick argmax(probs / -log(u)), ties
    to the lowest index.

    temperature / top_p are rounded to the logits' dtype (0-d tensors). Returns a 0-d int64 tensor on the
    logits' device (the reference returns int32; the value is the same).

    One guard the reference lacks: with bf16 noise u == 0 happens (about 1 element in 500 with torch 2.13 on
    the CPU) and gives probs / inf = 0; if that hits every kept token, a plain argmax would return index 0 even
    though it was removed. Removed positions therefore compare as -1, so the pick is always a kept token
    (identical to the reference whenever the reference picks a kept token).
    """
    if logits.dim() != 1:
        raise ValueError(f"sample expects a 1-D logit vector, got shape {tuple(logits.shape)}")
    dtype, device = logits.dtype, logits.device
    t = as_model_scalar(temperature, dtype, device)
    remove = removal_mask(logits, top_p, top_k)
    kept = logits.masked_fill(remove, float("-inf"))
    kept = kept / torch.clamp(t, min=1e-5)
    probs = torch.softmax(kept, dim=-1)
    u = torch.rand(probs.shape, generator=generator, dtype=dtype, device=device)
    return exponential_race(probs, u, remove)


def removal_mask(logits: Tensor, top_p: float | Tensor, top_k: int) -> Tensor:
    """§8.2 steps 1-4: bool [V] in vocabulary order, True = removed. Computed on the UNTEMPERED logits in their
    dtype: sorted position j is removed if cum[j] > top_p (top_p rounded to the logits' dtype) or j >= top_k;
    sorted position 0 is always kept."""
    p = as_model_scalar(top_p, logits.dtype, logits.device)
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove_sorted = cum > p
    remove_sorted[top_k:] = True
    remove_sorted[0] = False
    return torch.empty_like(remove_sorted).scatter_(0, order, remove_sorted)


def exponential_race(probs: Tensor, u: Tensor, removed: Tensor | None = None) -> Tensor:
    """§8.2 step 7: argmax_j probs_j / (-log u_j), ties to the lowest index (0-d int64). Removed positions
    (if given) compare as -1, so they can never win (see `sample`)."""
    race = probs / -torch.log(u)
    if removed is not None:
        race = race.masked_fill(removed, -1)
    return torch.argmax(race, dim=-1).to(torch.long)


def make_slow_sampler(model: DualARTransformer, params: SamplingParams, generator: torch.Generator | None):
    """The slow sampler with RAS (§8.3), for `generate(sample_slow=...)`: `(logits + bias [V], window) -> id`.

    Both t_norm = sample(ℓ', temperature, top_p, top_k) and t_high = sample(ℓ', 1.0, 0.9, top_k) are drawn on
    every step, in that order (RNG order). The token is t_high when a window exists (decode steps only; the
    prefill call passes None), t_norm is a semantic id and t_norm equals any token id (row 0) in the window;
    otherwise t_norm. The window itself is kept by `generate` (decode-step frames only, zeros at the start)."""
    cfg = model.cfg
    lo, hi = cfg.semantic_begin_id, cfg.semantic_end_id
    dtype = model.dtype
    t_norm_t = as_model_scalar(params.temperature, dtype, model.device)
    p_norm_t = as_model_scalar(params.top_p, dtype, model.device)
    t_high_t = as_model_scalar(spec.RAS_HIGH_TEMPERATURE, dtype, model.device)
    p_high_t = as_model_scalar(spec.RAS_HIGH_TOP_P, dtype, model.device)

    def sample_slow(logits: Tensor, window: Tensor | None) -> Tensor:
        t_norm = sample(logits, t_norm_t, p_norm_t, params.top_k, generator)
        t_high = sample(logits, t_high_t, p_high_t, params.top_k, generator)
        if window is None:
            return t_norm
        repeat = (t_norm >= lo) & (t_norm <= hi) & (window[0] == t_norm).any()
        return torch.where(repeat, t_high, t_norm)

    return sample_slow


def make_fast_sampler(model: DualARTransformer, params: SamplingParams, generator: torch.Generator | None):
    """The fast sampler (§6.3 step 4): the same `sample` and parameters as the slow token, no bias, no RAS."""
    t = as_model_scalar(params.temperature, model.dtype, model.device)
    p = as_model_scalar(params.top_p, model.dtype, model.device)

    def sample_fast(logits: Tensor) -> Tensor:
        return sample(logits, t, p, params.top_k, generator)

    return sample_fast


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A dedicated generator on `device`: seeded with `seed`, or from fresh OS entropy when seed is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def generate_sampled(model: DualARTransformer, prompt_tokens: Tensor, max_new_tokens: int = spec.API_MAX_NEW_TOKENS,
                     temperature: float = spec.API_TEMPERATURE, top_p: float = spec.API_TOP_P,
                     top_k: int = spec.DEFAULT_TOP_K, seed: int | None = None,
                     generator: torch.Generator | None = None, return_trace: bool = False, compile: bool = False):
    """Sampled generation (§8.2-§8.4) after a [C+1, P] prompt: frames [C+1, N] (every frame, including the
    last; `frames_to_codes` drops it), or (frames, trace) with return_trace.

    Randomness: `generator` if given (it is advanced, so several calls can share one stream), else a new
    generator on the model's device seeded with `seed` (None: fresh entropy). RNG order per frame: slow normal
    sample, slow high (RAS) sample, then the 9 fast samples. Defaults are the HTTP API's (§10). compile: see
    `generate` (the slow and fast steps compiled, sampling eager between them)."""
    params = SamplingParams(temperature, top_p, top_k)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (0 = until the context is full), got {max_new_tokens!r}")
    if generator is None:
        generator = make_generator(model.device, seed)
    elif seed is not None:
        raise ValueError("pass either seed or generator, not both")
    return generate(model, prompt_tokens, max_new_tokens, make_slow_sampler(model, params, generator),
                    make_fast_sampler(model, params, generator), return_trace=return_trace,
                    ras_window=spec.RAS_WINDOW, compile=compile)
