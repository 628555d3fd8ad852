"""The quantizers a phase file can pick (`quantizer:` key) and their settings (`quantizer_args:`).

A quantizer decides the stored values of one weight (its qparams, and for GPTQ the rounding order with error
feedback); every one of them ends in `primitives.pack_qtensor`, so the packed formats, the loader and the kernels
never depend on which one ran.

- `rtn`: today's round-to-nearest with absmax (or min/max) qparams (`primitives.quantize_tensor`).
- `mse`: per-group clip-ratio search minimising the rounding error (fishlab.quant.mse).
- `hqq`: calibration-free half-quadratic optimisation of the zero (or, on symmetric schemes, the scale)
  (fishlab.quant.hqq).
- `gptq`: Hessian-weighted error feedback from calibration inputs (fishlab.quant.gptq; the Hessian comes
  from fishlab.calibration).
"""
from __future__ import annotations

import torch

from .primitives import (NonFiniteWeightError, QTensor, QuantError, Scheme, _nonfinite_message, pack_qtensor,
                         quantize_tensor)

#: Each quantizer's settings and their defaults (a phase's `quantizer_args` overrides any of them).
#: mse's norm 3 (the error norm the clip search minimises): checked on the trained model against layer-output
#: error on CALIBRATION-text activations (tr(D H D^T), H from fishlab.calibration), 4 linears x INT4 g128 / INT3 g128
#: / INT2 g64: norm 3 beat RTN in all 12 cases (0.42-0.95 x), norm 2 lost in 4 (up to 1.36 x), norm 4 was close.
DEFAULT_ARGS: dict[str, dict] = {
    "rtn": {},
    "mse": {"grid": 41, "min_ratio": 0.2, "norm": 3.0},
    "hqq": {"iters": 20, "p": 0.7, "beta": 10.0, "kappa": 1.01, "keep_norm": 3.0},
    "gptq": {"block_size": 128, "damp": 0.01, "act_order": False, "qparams": "minmax"},
}

ROW_CHUNK_ELEMS = 1 << 22       # the searching quantizers work on blocks of whole rows of about this many values


def check_args(quantizer: str, args: dict) -> str:
    """'' when `args` are settings `quantizer` knows, else what is wrong (for the phase file's error)."""
    known = DEFAULT_ARGS.get(quantizer)
    if known is None:
        return f"unknown quantizer {quantizer!r} (known: {', '.join(DEFAULT_ARGS)})"
    unknown = sorted(set(args) - set(known))
    if unknown:
        return f"{quantizer} has no settings {unknown} (known: {', '.join(known) or 'none'})"
    for k, v in args.items():
        want = type(known[k])
        ok = isinstance(v, bool) if want is bool else (
            isinstance(v, str) if want is str else isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok:
            return f"{quantizer} setting {k} must be a {want.__name__}, got {v!r}"
    if quantizer == "gptq" and args.get("qparams", "minmax") not in ("minmax", "mse"):
        return f"gptq qparams must be minmax or mse, got {args['qparams']!r}"
    return ""


def resolved_args(quantizer: str, args: dict) -> dict:
    """The defaults with a phase's settings on top."""
    return {**DEFAULT_ARGS[quantizer], **args}


def quantize_weight(name: str, w: torch.Tensor, scheme: Scheme, quantizer: str = "rtn", args: dict | None = None,
                    hessian: torch.Tensor | None = None) -> QTensor:
    """One weight quantized by `quantizer` under `scheme` (on w's device; float32 math) -> QTensor.
    `hessian` [cols, cols]: the input Hessian a calibrated quantizer (gptq) needs."""
    a = resolved_args(quantizer, args or {})
    if quantizer == "rtn":
        return quantize_tensor(name, w, scheme)
    if scheme.method != "int":
        raise QuantError(f"{name}: quantizer {quantizer} needs an int scheme, got {scheme.name}")
    w2 = w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(1, -1)
    if not bool(torch.isfinite(w2).all()):
        raise NonFiniteWeightError(_nonfinite_message(name, w))
    if quantizer == "gptq":
        from .gptq import gptq_quantize
        if hessian is None:
            raise QuantError(f"{name}: gptq needs calibration inputs (a Hessian); quantize through "
                             f"quantize_checkpoint, which runs fishlab.calibration")
        w_hat, scale, zero = gptq_quantize(w2, hessian, scheme, name=name, **a)
        qt = pack_qtensor(name, w_hat.reshape(w.shape), scale, zero, scheme)   # float32 W': exactly its codes
        qt.dtype = w.dtype                                                      # the original weight's dtype
        return qt
    if quantizer == "mse":
        from .mse import mse_qparams as fn
    elif quantizer == "hqq":
        from .hqq import hqq_qparams as fn
    else:
        raise QuantError(f"unknown quantizer {quantizer!r} (known: {', '.join(DEFAULT_ARGS)})")
    from .grid import grouped
    rows, cols = w2.shape
    step = max(1, ROW_CHUNK_ELEMS // max(cols, 1))
    sparts, zparts = [], []
    for r0 in range(0, rows, step):
        wg, valid = grouped(w2[r0:r0 + step], scheme.group_size)
        s, z = fn(wg, valid, scheme, **a)
        sparts.append(s)
        zparts.append(z)
    scale = torch.cat(sparts).to(scheme.torch_scale_dtype)
    if not bool(torch.isfinite(scale).all()):
        raise QuantError(f"{name}: a scale overflows {scheme.scale_dtype}")
    zero = torch.cat(zparts).to(scheme.torch_scale_dtype) if scheme.zero_point else None
    return pack_qtensor(name, w, scale, zero, scheme)
