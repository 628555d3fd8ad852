"""A plain decoder-only text LM made of S2 Pro's slow-AR blocks: the runtime of the trained proxy model.

    embeddings   [vocab, dim]   token table, also the tied LM head
    layers.N.*   TransformerBlock of `fishlab.model.dualar` (SDPA attention, GQA, QK-norm when configured)
    norm         final RMSNorm

The modules and numerics are the slow AR's (fishlab.model.dualar), with two differences that a llama-family
model needs: the input is a plain [B, T] matrix of token ids (no codebook rows), and the RoPE table keeps the
config's `rope_dtype` (float32 for llama; S2 Pro rounds it to bfloat16). RoPE rotates interleaved pairs, which
is what GGUF's llama tensors expect: llama.cpp's converter permutes the HF Q/K rows so that a runtime rotating
(x[2i], x[2i+1]) pairs reproduces HF's rotate-half model, so the GGUF-stored Q/K are used as they are.

Linear names are the slow AR's (`layers.3.attention.wqkv`, `layers.3.feed_forward.w2`, ...), so
`replace_linears`, quantized checkpoints, `QuantizedLinear` and `fishlab.fidelity.kl_by_layer_group` work
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import TextLMConfig
from .dualar import TORCH_DTYPES, AttnPlan, KVCache, RMSNorm, SlowOutput, TransformerBlock, rope_table

__all__ = ["TextLM", "generate_greedy_ids"]


class TextLM(nn.Module):
    def __init__(self, cfg: TextLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.intermediate_size,
                             cfg.norm_eps, cfg.attention_qk_norm, "sdpa") for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rope_dtype = TORCH_DTYPES[cfg.rope_dtype]

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def cache_length(self) -> int:
        kv = self.layers[0].attention.kv_cache if len(self.layers) else None
        return 0 if kv is None else kv.length

    def setup_caches(self, max_seq_len: int, max_batch_size: int = 1) -> None:
        """A KV cache of `max_seq_len` positions (rounded up to 8, capped at the config's max_seq_len)."""
        if not 1 <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len must lie in 1..{self.cfg.max_seq_len}, got {max_seq_len}")
        length = min(self.cfg.max_seq_len, -(-max_seq_len // 8) * 8)
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, self.cfg.n_local_heads, length, self.cfg.head_dim,
                                           self.dtype, self.device)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, return_all: bool = True) -> SlowOutput:
        """tokens [B, T] (or [T]) ids -> logits [B, T', vocab] and final-normed hidden [B, T', dim] (T' = T, or
        1 when not return_all). input_pos=None: no cache, positions 0..T-1; else the positions [T] to write
        into (and attend over) the KV cache."""
        unbatched = tokens.dim() == 1
        if tokens.dim() not in (1, 2):
            raise ValueError(f"expected [T] or [B, T] token ids, got shape {tuple(tokens.shape)}")
        tok = tokens[None] if unbatched else tokens
        x = self.embeddings(tok)
        T = x.size(1)
        pos = input_pos if input_pos is not None else torch.arange(T, device=x.device)
        if pos.numel() != T:
            raise ValueError(f"{pos.numel()} positions given for {T} tokens")
        pos = pos.to(device=x.device, dtype=torch.long)
        if int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(pos.max())} is past the model's context of {self.cfg.max_seq_len}")
        rope = rope_table(pos, self.cfg.head_dim, self.cfg.rope_base, self.rope_dtype)
        plan = AttnPlan.build(pos, use_cache=input_pos is not None)
        for layer in self.layers:
            x = layer(x, rope, plan)
        if not return_all:
            x = x[:, -1:]
        h = self.norm(x)
        logits = F.linear(h, self.embeddings.weight)
        return SlowOutput(logits[0], h[0]) if unbatched else SlowOutput(logits, h)


@torch.inference_mode()
def generate_greedy_ids(model: TextLM, prompt: list[int], max_new_tokens: int, stop_ids: tuple = ()) -> list[int]:
    """Greedy continuation (argmax every step) of a prompt of token ids through the KV cache; stops early at
    any id in stop_ids (which is then included). Returns the new ids only."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    P = len(prompt)
    model.setup_caches(P + max_new_tokens)
    ids = torch.tensor(prompt, dtype=torch.long, device=model.device)
    logits = model(ids, input_pos=torch.arange(P, device=model.device), return_all=False).logits[-1]
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in stop_ids or i == max_new_tokens - 1:
            break
        col = torch.tensor([nxt], device=model.device)
        logits = model(col, input_pos=torch.tensor([P + i], device=model.device)).logits[-1]
    return out
