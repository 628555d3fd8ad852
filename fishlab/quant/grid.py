"""A scheme's rounding grid on grouped float32 views: the shared arithmetic of the calibrated quantizers.

`fishlab.quant.primitives` quantizes whole tensors with given qparams (and packs them); the quantizers that
*search* qparams (mse, hqq) or quantize column by column (gptq) need the same rounding on pieces of a tensor,
many times over. These functions do exactly what `primitives.quantize` / `dequantize` do (float32 division by
the stored - already rounded - scale, round half to even, clamp; a zero scale divides by 1), so the values a
search settles on are the values the packed file holds.

    wg, valid = grouped(w2, group_size)       # [rows, n_groups, g] float32, and where the columns are real
    w_hat = fake_quant(wg, scale, zero, scheme)   # dequantize(quantize(.)) per group
"""
from __future__ import annotations

import torch

from .primitives import Scheme, _group, _grouped


def grouped(w2: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w2`` [rows, cols] as float32 [rows, n_groups, g] (the last group zero-padded when g does not divide
    cols), and a bool [1, n_groups, g] mask of the real columns (None when nothing is padded)."""
    rows, cols = w2.shape
    g, n_groups = _group(cols, group_size)
    wg = _grouped(w2.to(torch.float32), g, n_groups)
    if n_groups * g == cols:
        return wg, None
    valid = (torch.arange(n_groups * g, device=w2.device) < cols).view(1, n_groups, g)
    return wg, valid


def round_to(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """float32 values rounded to the scheme's scale dtype and back (what storing a scale or zero does)."""
    return x.to(scheme.torch_scale_dtype).to(torch.float32)


def codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """The integer levels (float32) of ``wg`` [..., g] for qparams [...]: ``q in [-qmax, qmax]`` (symmetric) or
    ``u in [0, 2**bits - 1]`` (zero point)."""
    s = scale.to(torch.float32).unsqueeze(-1)
    x = wg / torch.where(s == 0, torch.ones_like(s), s)
    if zero is None:
        return torch.round(x).clamp_(-scheme.qmax, scheme.qmax)
    return torch.round(x + zero.to(torch.float32).unsqueeze(-1)).clamp_(0, scheme.levels)


def from_codes(c: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The dequantized values of levels ``c``: ``q * scale`` or ``(u - zero) * scale``."""
    s = scale.to(torch.float32).unsqueeze(-1)
    return c * s if zero is None else (c - zero.to(torch.float32).unsqueeze(-1)) * s


def fake_quant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """``dequantize(quantize(wg))`` per group, in float32."""
    return from_codes(codes(wg, scale, zero, scheme), scale, zero)


def minmax_qparams(wg: torch.Tensor, scheme: Scheme, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest qparams of groups ``wg`` [..., g], rounded to the scale dtype, with the range shrunk
    by ``ratio`` (1 = the plain RTN of `primitives.choose_qparams` / `choose_qparams_affine`, value for value).
    Zero padding changes neither max|W| nor min(W, 0) / max(W, 0)."""
    if not scheme.zero_point:
        amax = wg.abs().amax(dim=-1)
        return round_to(amax * ratio / scheme.qmax, scheme), None
    lo = wg.amin(dim=-1).clamp_max(0) * ratio
    hi = wg.amax(dim=-1).clamp_min(0) * ratio
    scale = round_to((hi - lo) / scheme.levels, scheme)
    zero = torch.where(scale == 0, torch.zeros_like(lo), -lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    return scale, round_to(zero, scheme)


def group_error(wg: torch.Tensor, valid: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor | None,
                scheme: Scheme, norm: float = 2.0) -> torch.Tensor:
    """``sum |W - W'|^norm`` per group [...] over the real columns (``valid``, from `grouped`)."""
    d = (fake_quant(wg, scale, zero, scheme) - wg).abs_().pow_(norm)
    if valid is not None:
        d = d * valid
    return d.sum(dim=-1)


def keep_better(best: tuple, cand: tuple) -> tuple:
    """Per group, the (error, scale, zero) of ``cand`` where its error is strictly lower, else ``best``'s (the
    searches start from RTN, so a group keeps RTN's qparams unless a candidate beats them)."""
    better = cand[0] < best[0]
    return tuple(None if b is None else torch.where(better, c, b) for b, c in zip(best, cand))
