"""HQQ-style qparams: calibration-free half-quadratic optimisation (Badri & Shaji, "Half-Quadratic Quantization
of Large Machine Learning Models", 2023), our own implementation of the paper's algorithm.

HQQ minimises ``||W - W'||_p^p`` with ``p < 1`` (a sparsity-promoting norm that lets a few outliers keep their
error) by splitting off an error variable ``W_e`` and alternating, per group, from the round-to-nearest qparams:

    c    = round(W / s + z)            (the codes, clamped to the grid)
    W_e  = shrink_p(W - (c - z) s, beta)      shrink_p(x) = sign(x) max(|x| - |x|^(p-1) / beta, 0)
    z    = mean(c - (W - W_e) / s)     (the closed-form zero for the current codes)
    beta = beta * kappa

with the paper's settings p = 0.7, beta = 10, kappa = 1.01, 20 iterations. Two points are ours and documented:

- symmetric schemes have no zero to fit; there the same alternation refits the scale,
  ``s = <c, W - W_e> / <c, c>`` (least squares for the current codes), so `hqq` also runs on them;
- every candidate is rounded to the scale dtype (the stored value), and each group keeps the candidate with the
  least ``sum |W - W'|^keep_norm`` seen (the first is RTN, so no group gets worse than RTN by that measure);
  ``keep_norm = 3`` weights the large errors more than a squared error does, as fishlab.quant.mse's default.
"""
from __future__ import annotations

import torch

from .grid import codes, from_codes, group_error, keep_better, minmax_qparams, round_to
from .primitives import Scheme


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-threshold of the lp (p < 1) proximal step."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_qparams(wg: torch.Tensor, valid: torch.Tensor | None, scheme: Scheme, iters: int = 20, p: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01, keep_norm: float = 3.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qparams (``scale``, ``zero`` or None) [..., n_groups] of grouped weights ``wg`` [..., n_groups, g]
    (``valid``: the real columns), rounded to the scheme's scale dtype."""
    m = torch.ones_like(wg) if valid is None else valid.expand_as(wg).to(wg.dtype)
    n = m.sum(dim=-1).clamp_min(1)
    s, z = minmax_qparams(wg, scheme)
    best = (group_error(wg, valid, s, z, scheme, keep_norm), s, z)
    for _ in range(iters):
        c = codes(wg, s, z, scheme)
        we = shrink_lp(wg - from_codes(c, s, z), beta, p)
        target = wg - we
        if z is not None:
            sd = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
            z = round_to(((c - target / sd) * m).sum(dim=-1) / n, scheme)
            z = torch.where(s == 0, torch.zeros_like(z), z)
        else:
            cc = (c * c * m).sum(dim=-1)
            s_new = (c * target * m).sum(dim=-1) / torch.where(cc == 0, torch.ones_like(cc), cc)
            s = torch.where(cc == 0, s, round_to(s_new.abs(), scheme))
        beta *= kappa
        best = keep_better(best, (group_error(wg, valid, s, z, scheme, keep_norm), s, z))
    return best[1], best[2]
