"""Clean-room DualAR transformer of Fish Audio S2 Pro (slow AR over time + fast AR over codebooks).

Written from the specification (../shared/spec/s2pro-model.md, "the spec"), in the style of a gpt-fast
model.py: one file, small explicit modules, read top to bottom. Section numbers below refer to the spec.

Layout of the model (parameter names == the manifest's internal names, see `fishlab.manifest`):

    embeddings            [vocab, dim]            token embedding and tied slow LM head
    codebook_embeddings   [C * codebook, dim]     C stacked codebook tables used in the SLOW input (§4)
    layers.N.*            slow blocks (QK-norm, SDPA attention, KV cache)
    norm                  final slow RMSNorm
    fast_project_in       only when fast_dim != dim (identity for S2 Pro, so normally absent)
    fast_embeddings       [codebook, fast_dim]     one table shared by every codebook
    fast_layers.N.*       fast blocks (no QK-norm, hand-written attention, KV cache of C slots)
    fast_norm, fast_output

Numerics that matter for parity with the reference (golden README §3):
- Block RMSNorm: normalise in fp32, cast to the input dtype, then multiply by the weight (§5.2).
- QK-norm: normalise x weight in fp32 with one cast (the fused built-in kernel, §5.3).
- RoPE: angles and cos/sin in fp32, table rounded to bfloat16 (also in a float32 model), interleaved GPT-J
  pairs, rotation done in fp32 (§5.4). Tables are computed for the positions in use, never 32768 rows.
- Fast attention: hand-written matmul / scale / bias / softmax / matmul, each rounded to the model dtype (§6.1).

Memory: the slow KV cache is sized to what the caller asks for (`setup_caches(max_seq_len)`), allocated in the
model dtype; masks are built for the positions in use only. No [max_seq_len, max_seq_len] buffer exists.

Decoding (the generation loop's hot path) has its own entry points: `decode_step_static` runs one slow step with
static shapes (attention over the whole KV cache with a position mask, RoPE rows from a table made once per
cache, the position as a device tensor: no host synchronisation, so `torch.compile(mode="reduce-overhead")` /
CUDA graphs can capture it), and both it and `prefill(allowed_only=True)` score only the ids the sampler may emit
(`slow_head(..., allowed_only=True)`: the semantic rows + <|im_end|>, 4,097 of 155,776 rows for S2 Pro, the same
values as those columns of the full head).

Every linear layer is an `nn.Linear` (no bias) addressed by its internal name (`layers.3.attention.wqkv`,
`fast_layers.0.feed_forward.w2`, `fast_output`, ...). `replace_linears` swaps them for any module with a
`forward(x) -> x @ W^T` (e.g. a packed quantized linear). The slow head is tied to `embeddings` and is not a
linear module.

All tensors below are batch-first: token matrices are [B, C+1, T] (row 0 token ids, rows 1..C codes c0..c_{C-1}).
The public methods also accept an unbatched [C+1, T] matrix and then return unbatched results.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import DualARConfig
from ..quant.qlinear import float_linear

__all__ = [
    "RMSNorm", "QKNorm", "rope_table", "apply_rope", "KVCache", "Attention", "FeedForward", "TransformerBlock",
    "AttnPlan", "SlowOutput", "DualARTransformer", "replace_linears", "linear_names", "TORCH_DTYPES",
    "allowed_slow_ids",
]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# Norms (§5.2, §5.3)
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Block / final RMSNorm: fp32 normalise, cast back to the input dtype, then x weight (two roundings)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return n.to(x.dtype) * self.weight


class QKNorm(RMSNorm):
    """Per-head RMSNorm on q / k (slow AR only): fp32 normalise x fp32 weight, a single cast at the end.

    This is the rounding of torch's fused built-in RMSNorm kernel, which the spec (§5.3) recommends for
    q_norm/k_norm. In float32 both variants are the same.
    """

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (n * self.weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Rotary embedding (§5.4)
# ----------------------------------------------------------------------------------------------------

def rope_table(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """bf16 (cos, sin) rows for the given absolute positions: [len(positions), head_dim/2, 2].

    angle[t, i] = float32(t) * inv_freq[i], inv_freq[i] = 1 / base^(float32(2i)/d), both in fp32. cos/sin go
    through the unit complex number (torch.polar), as the reference does, then are rounded to bfloat16 whatever
    the model dtype is. Each row depends on its own position only, so computing just the rows in use gives
    exactly the rows of the reference's full table. `dtype=torch.float32` keeps the fp32 table that
    llama-family runtimes use (the text LM of `fishlab.model.textlm`); S2 Pro always rounds to bfloat16.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    z = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).to(dtype)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Interleaved (GPT-J) rotation of x [B, T, H, D] by table [T, D/2, 2]; computed in fp32, cast back."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.float().view(1, xs.size(1), 1, xs.size(3), 2)
    cos, sin = t[..., 0], t[..., 1]
    x0, x1 = xs[..., 0], xs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# KV cache (§7)
# ----------------------------------------------------------------------------------------------------

class KVCache(nn.Module):
    """K and V of one layer, [B, n_kv_heads, length, head_dim] each, in the model dtype.

    Buffers are non-persistent: they never appear in a state dict.
    """

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def length(self) -> int:
        return self.k_cache.size(2)

    def update(self, input_pos: Tensor | int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, D] at slots input_pos [T] (or, for T = 1, the Python int slot) of the first B
        batch rows; return those B rows of the whole cache."""
        B = k.size(0)
        if B > self.k_cache.size(0):
            raise ValueError(f"batch {B} exceeds the KV cache batch {self.k_cache.size(0)}")
        if isinstance(input_pos, int):                      # a static slot: a plain slice write
            input_pos = slice(input_pos, input_pos + 1)
        self.k_cache[:B, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:B, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:B], self.v_cache[:B]


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, block (§5.1, §5.3, §5.5, §6.1)
# ----------------------------------------------------------------------------------------------------

@dataclass
class AttnPlan:
    """Which keys each query sees, decided once per forward (not per layer).

    input_pos: [T] cache slots to write (a Python int for one static slot), or None (no cache: positions
    0..T-1, keys = this call's k/v).
    n_keys: keys 0..n_keys-1 are attended over.
    mask: bool [T, n_keys] (True = visible) when needed, None when `causal` or when every key is visible.
    grouped: one decode query (T = 1) attends as [n_kv_heads, group] queries per kv head instead of repeating
    the keys group times (the same products, no copy of the cache; the static decode step uses it).
    """
    input_pos: Tensor | int | None
    n_keys: int
    causal: bool
    mask: Tensor | None
    grouped: bool = False

    @staticmethod
    def build(positions: Tensor, use_cache: bool) -> "AttnPlan":
        """Plan for queries at `positions` [T] attending to keys 0..p (query at position p). Only masks for
        the positions in use are ever built: at most [T, max(positions)+1]."""
        T = positions.numel()
        n_keys = int(positions.max()) + 1 if use_cache else T          # the one host sync of a forward
        if T == 1 and use_cache:                                       # decode: every key 0..p is visible
            return AttnPlan(positions, n_keys, False, None)
        first = int(positions[0]) if use_cache else 0
        if n_keys == T and first == 0 and (not use_cache or bool((positions == torch.arange(
                T, device=positions.device)).all())):                  # a whole causal block from 0
            return AttnPlan(positions if use_cache else None, n_keys, True, None)
        mask = torch.arange(n_keys, device=positions.device)[None, :] <= positions[:, None]
        return AttnPlan(positions if use_cache else None, n_keys, False, mask)

    def visible(self, T: int, device: torch.device) -> Tensor | None:
        """The bool mask, materialised for a causal plan (the hand-written routine needs it); None = all."""
        if self.causal:
            return torch.ones(T, self.n_keys, dtype=torch.bool, device=device).tril(self.n_keys - T)
        return self.mask


class Attention(nn.Module):
    """Fused-QKV GQA attention. kind="sdpa" (slow AR) or "manual" (fast AR's hand-written routine)."""

    def __init__(self, dim: int, n_head: int, n_kv_heads: int, head_dim: int, eps: float, qk_norm: bool,
                 kind: str):
        super().__init__()
        assert kind in ("sdpa", "manual")
        self.n_head, self.n_kv_heads, self.head_dim, self.kind = n_head, n_kv_heads, head_dim, kind
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = QKNorm(head_dim, eps)
            self.k_norm = QKNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, plan: AttnPlan) -> Tensor:
        """x [B, T, dim], rope [T, D/2, 2] rows for the positions of x, plan: cache slots and visibility."""
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_heads
        q, k, v = self.wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.q_norm is not None:                                # QK-norm before RoPE (§5.3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, H, T, D]

        if plan.input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("KV cache not set up: call model.setup_caches(...) first")
            if plan.n_keys > self.kv_cache.length:
                raise ValueError(f"position {plan.n_keys - 1} is past the KV cache length {self.kv_cache.length}")
            k_all, v_all = self.kv_cache.update(plan.input_pos, k, v)
            k, v = k_all[:, :, : plan.n_keys], v_all[:, :, : plan.n_keys]

        group = nh // nkv                                          # GQA: kv head j serves heads gj..gj+g-1
        if plan.grouped and T == 1 and self.kind == "sdpa":       # [B, nkv, group, D] queries, keys as cached
            y = F.scaled_dot_product_attention(q.reshape(B, nkv, group, hd), k, v, attn_mask=plan.mask)
            return self.wo(y.reshape(B, T, nh * hd))
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.causal)
        else:
            y = self._manual(q, k, v, plan.visible(T, x.device))
        return self.wo(y.transpose(1, 2).reshape(B, T, nh * hd))

    def _manual(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None) -> Tensor:
        # §6.1: every step in the model dtype: s = q k^T; s *= 1/sqrt(d); s += bias(0/-inf); softmax; p v.
        s = q @ k.transpose(-2, -1)
        s = s * (1.0 / math.sqrt(self.head_dim))
        if visible is not None:                                    # an all-zero bias would change nothing
            bias = torch.zeros(visible.shape, dtype=s.dtype, device=s.device)
            s = s + bias.masked_fill_(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return p @ v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), all in the activation dtype (§5.5)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(attention_norm(x)); out = h + ffn(ffn_norm(h)) (§5.1)."""

    def __init__(self, dim: int, n_head: int, n_kv_heads: int, head_dim: int, hidden: int, eps: float,
                 qk_norm: bool, kind: str):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_heads, head_dim, eps, qk_norm, kind)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, rope: Tensor, plan: AttnPlan) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, plan)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------------------------------
# The DualAR model
# ----------------------------------------------------------------------------------------------------

@dataclass
class SlowOutput:
    """logits [B, T', vocab] (no bias) and hidden [B, T', dim] = final-normed hidden state (the fast AR input).
    T' = T when all positions are requested, else 1 (the last position)."""
    logits: Tensor
    hidden: Tensor


def allowed_slow_ids(cfg: DualARConfig, device: torch.device | str | None = None) -> Tensor:
    """The ids the slow sampler may emit (spec §8.1: semantic_begin..semantic_end and <|im_end|>), ascending
    (vocabulary order, so argmax ties and stable sorts behave as over the full biased vocabulary)."""
    ids = list(range(cfg.semantic_begin_id, cfg.semantic_end_id + 1))
    if not cfg.semantic_begin_id <= cfg.eos_token_id <= cfg.semantic_end_id:
        ids.append(cfg.eos_token_id)
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


@dataclass
class DecodeTables:
    """What the static decode step reads besides weights and caches, made once per cache (plain tensors, not
    buffers): RoPE rows for every slow cache slot [L, D/2, 2] and the slot indices [L]."""
    length: int
    slow_rope: Tensor
    slots: Tensor


@contextlib.contextmanager
def _math_sdpa() -> Iterator[None]:
    """The reference runs every decode step under the MATH SDPA backend only (§5.3); mirror that."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch: default selection
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


class DualARTransformer(nn.Module):
    """Inference-path DualAR model. See the module docstring for layout and numerics."""

    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.num_codebooks
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.codebook_embeddings = nn.Embedding(cfg.codebook_size * C, cfg.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.intermediate_size,
                             cfg.norm_eps, cfg.attention_qk_norm, "sdpa") for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # fast AR: text_config's rope_base / norm_eps are used for both (§2.1)
        if cfg.has_fast_project_in:
            self.fast_project_in = nn.Linear(cfg.dim, cfg.fast_dim, bias=False)
        else:
            self.fast_project_in = None
        self.fast_embeddings = nn.Embedding(cfg.codebook_size, cfg.fast_dim)
        self.fast_layers = nn.ModuleList(
            TransformerBlock(cfg.fast_dim, cfg.fast_n_head, cfg.fast_n_local_heads, cfg.fast_head_dim,
                             cfg.fast_intermediate_size, cfg.norm_eps, False, "manual")
            for _ in range(cfg.fast_n_layer))
        self.fast_norm = RMSNorm(cfg.fast_dim, cfg.norm_eps)
        self.fast_output = nn.Linear(cfg.fast_dim, cfg.codebook_size, bias=False)

    # --- plumbing ---
    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def cache_length(self) -> int:
        """Slots of the slow KV cache (0 when no cache is set up)."""
        kv = self.layers[0].attention.kv_cache if len(self.layers) else None
        return 0 if kv is None else kv.length

    def setup_caches(self, max_seq_len: int, max_batch_size: int = 1, dtype: torch.dtype | None = None) -> None:
        """Allocate the slow KV cache for `max_seq_len` positions (rounded up to a multiple of 8, capped at the
        config's max_seq_len) and the fast KV cache (num_codebooks slots), both in the model dtype unless
        `dtype` is given. Replaces any existing caches."""
        cfg = self.cfg
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if max_seq_len > cfg.max_seq_len:
            raise ValueError(f"{max_seq_len} positions requested but the model's max_seq_len is {cfg.max_seq_len}")
        length = min(cfg.max_seq_len, -(-max_seq_len // 8) * 8)
        dtype = dtype or self.dtype
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, cfg.n_local_heads, length, cfg.head_dim, dtype,
                                           self.device)
        for b in self.fast_layers:
            b.attention.kv_cache = KVCache(max_batch_size, cfg.fast_n_local_heads, cfg.num_codebooks,
                                           cfg.fast_head_dim, dtype, self.device)
        self._tables = None

    def decode_tables(self) -> DecodeTables:
        """The static decode step's tables for the current slow cache (made on first use after setup_caches)."""
        t = getattr(self, "_tables", None)
        L = self.cache_length
        if L == 0:
            raise RuntimeError("KV cache not set up: call model.setup_caches(...) first")
        if t is None or t.length != L or t.slots.device != self.device:
            cfg, dev = self.cfg, self.device
            slots = torch.arange(L, device=dev)
            t = self._tables = DecodeTables(L, rope_table(slots, cfg.head_dim, cfg.rope_base), slots)
        return t

    def _fast_rope(self) -> Tensor:
        """RoPE rows of the C fast positions (each row is that position's own row, §5.4), made once per device."""
        t = getattr(self, "_fast_rope_rows", None)
        if t is None or t.device != self.device:
            pos = torch.arange(self.cfg.num_codebooks, device=self.device)
            t = self._fast_rope_rows = rope_table(pos, self.cfg.fast_head_dim, self.cfg.rope_base)
        return t

    def _ensure_fast_cache(self, batch: int) -> None:
        kv = self.fast_layers[0].attention.kv_cache if len(self.fast_layers) else None
        if len(self.fast_layers) and (kv is None or kv.k_cache.size(0) < batch or kv.k_cache.dtype != self.dtype):
            cfg = self.cfg
            for b in self.fast_layers:
                b.attention.kv_cache = KVCache(batch, cfg.fast_n_local_heads, cfg.num_codebooks,
                                               cfg.fast_head_dim, self.dtype, self.device)

    @staticmethod
    def _batched(tokens: Tensor) -> tuple[Tensor, bool]:
        if tokens.dim() == 2:
            return tokens[None], True
        if tokens.dim() != 3:
            raise ValueError(f"expected a [C+1, T] or [B, C+1, T] token matrix, got shape {tuple(tokens.shape)}")
        return tokens, False

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.size(1) != self.cfg.num_codebooks + 1:
            raise ValueError(f"token matrix has {tokens.size(1)} rows, expected num_codebooks+1 = "
                             f"{self.cfg.num_codebooks + 1}")

    # --- slow AR ---
    def embed(self, tokens: Tensor, scale_codebooks: bool = True) -> Tensor:
        """Slow-AR input embeddings (§4) of a [B, C+1, T] (or [C+1, T]) matrix -> [B, T, dim] (or [T, dim]).

        Non-semantic column: embeddings[tok]. Semantic column (semantic_begin <= tok <= semantic_end):
        (embeddings[tok] + sum_i codebook_embeddings[code_i + i*codebook_size]) / sqrt(C+1); the codebook sum is
        one reduction, then one add, then the division, each rounded to the model dtype.
        `scale_codebooks=False` gives the TRAINING embedding (no 1/sqrt(C+1)), kept only to document the
        reference's train/inference difference (§12); inference always scales.
        """
        tokens, unbatched = self._batched(tokens)
        self._check_tokens(tokens)
        cfg = self.cfg
        tok = tokens[:, 0]                                                   # [B, T]
        sem = (tok >= cfg.semantic_begin_id) & (tok <= cfg.semantic_end_id)
        offsets = torch.arange(cfg.num_codebooks, device=tokens.device)[None, :, None] * cfg.codebook_size
        codes = tokens[:, 1:] * sem[:, None, :]                              # text columns look up row 0s
        vq = self.codebook_embeddings(codes + offsets).sum(dim=1)           # [B, T, dim]
        x = self.embeddings(tok) + vq * sem[..., None].to(vq.dtype)
        if scale_codebooks:
            x = torch.where(sem[..., None], x / math.sqrt(cfg.num_codebooks + 1), x)
        return x[0] if unbatched else x

    def forward_slow(self, tokens: Tensor, input_pos: Tensor | None = None, return_all: bool = True,
                     scale_codebooks: bool = True, allowed_only: bool = False) -> SlowOutput:
        """Slow AR over a [B, C+1, T] (or [C+1, T]) matrix.

        input_pos=None: no KV cache, positions 0..T-1 (the golden `slow_logits` call).
        input_pos=[T] positions: uses and fills the KV cache (prefill / decode).
        return_all: logits/hidden at every position; else only the last one. Unbatched input gives
        unbatched output ([T', vocab], [T', dim]). allowed_only: logits over `allowed_slow_ids` only
        ([..., A]; see `slow_head`).
        """
        tokens, unbatched = self._batched(tokens)
        x = self.embed(tokens, scale_codebooks=scale_codebooks)
        T = x.size(1)
        pos = input_pos if input_pos is not None else torch.arange(T, device=x.device)
        if pos.numel() != T:
            raise ValueError(f"{pos.numel()} positions given for {T} columns")
        pos = pos.to(device=x.device, dtype=torch.long)
        rope = rope_table(pos, self.cfg.head_dim, self.cfg.rope_base)
        plan = AttnPlan.build(pos, use_cache=input_pos is not None)
        for layer in self.layers:
            x = layer(x, rope, plan)
        if not return_all:
            x = x[:, -1:]
        h = self.norm(x)
        logits = self.slow_head(h, allowed_only)
        if unbatched:
            return SlowOutput(logits[0], h[0])
        return SlowOutput(logits, h)

    def slow_head(self, h: Tensor, allowed_only: bool = False) -> Tensor:
        """The tied head: h @ embeddings^T -> [..., vocab]; allowed_only: only the rows of `allowed_slow_ids`
        -> [..., A] in that (ascending) order, read as views of the table (the semantic rows are contiguous),
        so decoding reads 4,097 rows instead of 155,776 (0.8 GB less per frame for S2 Pro in bf16)."""
        w = self.embeddings.weight
        if not allowed_only:
            return F.linear(h, w)
        cfg = self.cfg
        lo, hi, eos = cfg.semantic_begin_id, cfg.semantic_end_id, cfg.eos_token_id
        sem = float_linear(h, w[lo: hi + 1])              # contiguous rows: fishlab's GEMV when decoding
        if lo <= eos <= hi:
            return sem
        e = F.linear(h, w[eos: eos + 1])
        return torch.cat([e, sem] if eos < lo else [sem, e], dim=-1)

    def prefill(self, tokens: Tensor, return_all: bool = False, allowed_only: bool = False) -> SlowOutput:
        """Run the prompt at positions 0..T-1 through the KV cache (sets up a cache of T slots if none, or too
        small, exists). Returns the last position's logits/hidden unless return_all."""
        tokens_b, _ = self._batched(tokens)
        T = tokens_b.size(-1)
        kv = self.layers[0].attention.kv_cache if len(self.layers) else None
        if self.cache_length < T or (kv is not None and kv.k_cache.size(0) < tokens_b.size(0)):
            self.setup_caches(T, max_batch_size=tokens_b.size(0))
        return self.forward_slow(tokens, torch.arange(T, device=self.device), return_all=return_all,
                                 allowed_only=allowed_only)

    def decode_step(self, column: Tensor, pos: int) -> SlowOutput:
        """One slow step: a single column [C+1] (or [B, C+1], or [B, C+1, 1]) at absolute position `pos`
        through the KV cache, under the MATH SDPA backend as the reference's decode loop. Returns logits
        [vocab] / hidden [dim] for an unbatched column, else [B, 1, vocab] / [B, 1, dim]."""
        unbatched = column.dim() == 1
        col = column.reshape(-1, self.cfg.num_codebooks + 1, 1)
        with _math_sdpa():
            out = self.forward_slow(col, torch.tensor([pos], device=self.device), return_all=True)
        if unbatched:
            return SlowOutput(out.logits[0, 0], out.hidden[0, 0])
        return out

    def decode_step_static(self, column: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """One slow step with static shapes and no host synchronisation: column [C+1] (long, on the model's
        device) at position pos [1] (a device tensor). Attends over the whole slow KV cache with a mask hiding
        slots > pos (stale slots are never visible), RoPE row from `decode_tables`, grouped GQA (no key copies).
        Returns (logits over `allowed_slow_ids` [A], hidden [dim]). Call it under the MATH SDPA backend (the
        reference's decode; `generate` does) and after `setup_caches` / `prefill`."""
        t = self.decode_tables()
        x = self.embed(column.reshape(1, self.cfg.num_codebooks + 1, 1))
        rope = t.slow_rope.index_select(0, pos)
        plan = AttnPlan(pos, t.length, False, (t.slots <= pos).reshape(1, t.length), grouped=True)
        for layer in self.layers:
            x = layer(x, rope, plan)
        h = self.norm(x)
        return self.slow_head(h, allowed_only=True)[0, 0], h[0, 0]

    # --- fast AR ---
    def fast_step_static(self, x: Tensor, pos: Tensor) -> Tensor:
        """`fast_step` with the fast position as a device tensor pos [1]: attends over all C fast slots with a
        mask hiding slots > pos, so one graph serves every position (for a compiled sampled decode, where
        sampling runs between fast steps). x [B, 1, fast_dim] -> logits [B, 1, codebook_size]."""
        self._ensure_fast_cache(x.size(0))
        C = self.cfg.num_codebooks
        rope = self._fast_rope().index_select(0, pos)
        visible = (torch.arange(C, device=x.device) <= pos).reshape(1, C)
        plan = AttnPlan(pos, C, False, visible)
        for layer in self.fast_layers:
            x = layer(x, rope, plan)
        return self.fast_output(self.fast_norm(x))

    def fast_input(self, hidden: Tensor) -> Tensor:
        """The fast AR's step-0 input from the slow final-normed hidden state (identity unless fast_dim != dim)."""
        return hidden if self.fast_project_in is None else self.fast_project_in(hidden)

    def fast_step(self, x: Tensor, pos: int) -> Tensor:
        """One fast-AR position: x [B, 1, fast_dim] at fast position `pos` (0..C-1), through the fast KV cache
        (slot `pos`, mask allowing slots 0..pos). Returns logits [B, 1, codebook_size]."""
        self._ensure_fast_cache(x.size(0))
        rope = self._fast_rope()[pos: pos + 1]                    # static: no host-to-device copy per step
        plan = AttnPlan(pos, pos + 1, False, None)                # keys = slots 0..pos, all visible
        for layer in self.fast_layers:
            x = layer(x, rope, plan)
        return self.fast_output(self.fast_norm(x))

    def fast_logits_teacher_forced(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Fast-AR logits through the per-step KV-cache path, with given codes instead of sampled ones.

        hidden [B, dim] (or [dim]): final-normed slow hidden state; codes [B, C] (or [C]) = c0..c_{C-1} of
        the frame. Step 0 runs on the hidden state (its logits are discarded at inference; they predict c0
        in training), step i >= 1 runs on fast_embeddings(clamp(c_{i-1})) at position i and predicts c_i.
        Returns [B, C, codebook_size] (or [C, codebook_size]).
        """
        unbatched = hidden.dim() == 1
        h = hidden.reshape(-1, 1, hidden.size(-1))
        c = codes.reshape(h.size(0), -1)
        out = [self.fast_step(self.fast_input(h), 0)]
        for i in range(1, self.cfg.num_codebooks):
            x = self.fast_embeddings(c[:, i - 1:i].clamp(0, self.cfg.codebook_size - 1))
            out.append(self.fast_step(x, i))
        logits = torch.cat(out, dim=1)
        return logits[0] if unbatched else logits

    def fast_forward_parallel(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """TRAINING-mode fast AR: all C positions at once with a causal mask, no cache.

        Input sequence [fast_input(hidden), emb(c0), ..., emb(c_{C-2})] at positions 0..C-1 -> logits
        [N, C, codebook_size], where position i predicts c_i (position 0 predicts c0). hidden [N, dim],
        codes [N, C]. Mathematically the same as `fast_logits_teacher_forced`; kept to reproduce the
        reference's training outputs.
        """
        C = self.cfg.num_codebooks
        x = torch.cat([self.fast_input(hidden)[:, None],
                       self.fast_embeddings(codes[:, : C - 1].clamp(0, self.cfg.codebook_size - 1))], dim=1)
        pos = torch.arange(C, device=x.device)
        rope = rope_table(pos, self.cfg.fast_head_dim, self.cfg.rope_base)
        plan = AttnPlan(None, C, True, None)
        for layer in self.fast_layers:
            x = layer(x, rope, plan)
        return self.fast_output(self.fast_norm(x))

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, return_all: bool = True) -> SlowOutput:
        """Same as `forward_slow` (the model's main call)."""
        return self.forward_slow(tokens, input_pos, return_all)


# ----------------------------------------------------------------------------------------------------
# Linear-swap hook (quantization seam)
# ----------------------------------------------------------------------------------------------------

def linear_names(model: nn.Module) -> list[str]:
    """Internal names of every nn.Linear in the model, in module order (e.g. 'layers.0.attention.wqkv')."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def replace_linears(model: nn.Module, factory: Callable[[str, nn.Linear], nn.Module | None],
                    names: list[str] | None = None) -> list[str]:
    """Swap linear layers by internal name: for every nn.Linear (or only those in `names`), call
    factory(name, linear); a returned module replaces it (None keeps it). The replacement needs only
    `forward(x) -> x @ W^T`. Returns the names replaced."""
    targets = linear_names(model) if names is None else list(names)
    replaced = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = factory(name, old)
        if new is not None and new is not old:
            setattr(parent, child, new)
            replaced.append(name)
    return replaced
