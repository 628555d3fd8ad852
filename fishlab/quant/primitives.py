"""Quantization primitives: choose_qparams / quantize / dequantize and the QTensor container.

Schemes (symmetric unless ``zero_point``):

* ``fp8``  : float8_e4m3fn, ``scale = max|W_group| / 448``, ``q = fp8(W / scale)``
  (values clamped to +-448 before the round-to-nearest-even cast), ``W' = q.float() * scale``.
* ``int``  : restricted range ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``,
  ``scale = max|W_group| / qmax``, ``q = clamp(round_half_even(W / scale), -qmax, qmax)``,
  ``W' = q * scale``.
* ``int`` with ``zero_point`` (INT2/3/4, format version 2): all ``2**bits`` levels ``u in [0, 2**bits - 1]``
  and a float zero point per group: ``W' = (u - zero) * scale``.  The stored value is the signed
  ``q = u - 2**(bits-1)`` (so the offset-binary packing writes ``u`` itself).  Round-to-nearest picks
  ``lo = min(W_group, 0)``, ``hi = max(W_group, 0)``, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zero = -lo / scale`` (:func:`choose_qparams_affine`); the calibrated quantizers (fishlab.quant.mse,
  .hqq, .gptq) choose scale and zero their own way and store them the same way.

Conventions
-----------
* A weight of shape ``(d0, d1, ...)`` is viewed as a matrix ``[rows, cols]`` with
  ``rows = d0`` and ``cols = d1 * d2 * ...`` (a 1-D tensor is a single row).  Groups are
  runs of ``group_size`` consecutive elements along ``cols`` (the input features of a
  Linear); ``group_size=None`` means one group per row (per output channel).
* All math is float32, starting from the stored weight values.
* Scales have shape ``[rows, n_groups]`` (``n_groups = ceil(cols / group_size)``, 1 per
  row) and are stored in ``scale_dtype``.  When that is bf16/fp16 the scale is rounded
  *first* and both quantization and dequantization use the rounded value, so that
  ``dequantize(quantize(W))`` is self-consistent with the stored scale.
* **All-zero groups**: the scale is stored as ``0``; quantization divides by 1 instead
  (so ``q = 0``) and dequantization gives ``0 * q = 0``.  No NaN can arise.  The same
  holds for a group whose scale underflows to 0 in fp16 (``max|W| < ~6e-8 * qmax``):
  the group then dequantizes to zeros.
* **Group size not dividing cols**: the last group of every row is shorter
  (``cols % group_size`` elements).  This is equivalent to zero-padding the row to
  ``n_groups * group_size`` (zeros never change ``max|W|`` and quantize to 0) but the
  padding is *not stored*: packed data holds exactly ``rows * cols`` values and the
  original shape is restored on dequantization.  ``QTensor.group_padding`` reports the
  number of implied padding columns.
* NaN/Inf anywhere in a weight raises :class:`NonFiniteWeightError` naming the tensor.
* fp16 scales that overflow (``max|W| / qmax > 65504``) raise :class:`QuantError`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import pack as _pack

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "FP8_MAX",
    "SCALE_DTYPES",
    "SchemeError",
    "QuantError",
    "NonFiniteWeightError",
    "Scheme",
    "FP8_ROW",
    "INT8_ROW",
    "INT4_G128",
    "INT3_G128",
    "INT2_G64",
    "QTensor",
    "choose_qparams",
    "choose_qparams_affine",
    "quantize",
    "dequantize",
    "quantize_tensor",
    "pack_qtensor",
    "dequantize_tensor",
    "describe",
    "from_description",
]

#: Version of the packed on-disk format described in docs/packed-format.md (2 added zero points; a version-1
#: file is a version-2 file without them, and still loads).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0

SCALE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}

Bits = Union[int, str]


class SchemeError(ValueError):
    """An invalid quantization scheme or scheme description."""


class QuantError(ValueError):
    """A tensor that cannot be quantized / a malformed quantized tensor."""


class NonFiniteWeightError(QuantError):
    """A weight contains NaN or Inf (the message names the tensor)."""


# --------------------------------------------------------------------------- Scheme


@dataclass(frozen=True)
class Scheme:
    """A weight quantization scheme.

    method: ``"fp8"`` (float8_e4m3fn, bits must be 8) or ``"int"`` (bits in 2, 3, 4, 8).
    group_size: ``None`` = one scale per output row, else elements per group along cols.
    scale_dtype: ``"float32"`` | ``"bfloat16"`` | ``"float16"``.
    zero_point: asymmetric ``int`` (bits 2, 3, 4): a zero point per group beside each scale, stored in
    ``scale_dtype``; ``W' = (u - zero) * scale`` over all ``2**bits`` levels.
    """

    method: str
    bits: int
    group_size: Optional[int] = None
    scale_dtype: str = "float32"
    zero_point: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("fp8", "int"):
            raise SchemeError(f"method must be 'fp8' or 'int', got {self.method!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SchemeError(f"bits must be an int, got {self.bits!r}")
        if self.method == "fp8" and self.bits != 8:
            raise SchemeError(f"method 'fp8' requires bits=8, got {self.bits}")
        if self.method == "int" and self.bits not in (2, 3, 4, 8):
            raise SchemeError(f"method 'int' supports bits 2, 3, 4, 8, got {self.bits}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise SchemeError(f"group_size must be a positive int or None, got {self.group_size!r}")
            if self.group_size < 1:
                raise SchemeError(f"group_size must be >= 1, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(
                f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if not isinstance(self.zero_point, bool):
            raise SchemeError(f"zero_point must be true or false, got {self.zero_point!r}")
        if self.zero_point and (self.method != "int" or self.bits not in (2, 3, 4)):
            raise SchemeError(f"zero_point needs method 'int' with bits 2, 3 or 4, got {self.method} {self.bits}")

    @property
    def levels(self) -> int:
        """Largest stored level ``u`` of an asymmetric scheme: ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def pack_bits(self) -> Bits:
        """The ``bits`` argument for :mod:`fishlab.quant.pack` (``"fp8"`` or an int)."""
        return "fp8" if self.method == "fp8" else self.bits

    @property
    def qmax(self) -> float:
        """Largest representable magnitude: 448 for fp8, ``2**(bits-1)-1`` for int."""
        return FP8_MAX if self.method == "fp8" else float((1 << (self.bits - 1)) - 1)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def name(self) -> str:
        """Short name, e.g. ``int4_g128``, ``int8_row``, ``fp8_row``, ``int4_g128_bf16``."""
        base = "fp8" if self.method == "fp8" else f"int{self.bits}"
        grp = "row" if self.group_size is None else f"g{self.group_size}"
        suffix = {"float32": "", "bfloat16": "_bf16", "float16": "_fp16"}[self.scale_dtype]
        return f"{base}_{grp}{'_zp' if self.zero_point else ''}{suffix}"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        if not isinstance(d, dict):
            raise SchemeError(f"scheme description must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"method", "bits", "group_size", "scale_dtype", "zero_point"}
        if unknown:
            raise SchemeError(f"unknown scheme keys: {sorted(unknown)}")
        try:
            return cls(
                method=d["method"],
                bits=d["bits"],
                group_size=d.get("group_size"),
                scale_dtype=d.get("scale_dtype", "float32"),
                zero_point=d.get("zero_point", False),
            )
        except KeyError as e:
            raise SchemeError(f"scheme description lacks {e.args[0]!r}") from None


FP8_ROW = Scheme("fp8", 8, None)
INT8_ROW = Scheme("int", 8, None)
INT4_G128 = Scheme("int", 4, 128)
INT3_G128 = Scheme("int", 3, 128)
INT2_G64 = Scheme("int", 2, 64)


# --------------------------------------------------------------------------- helpers


def _is_fp8(bits: Bits) -> bool:
    if bits == "fp8":
        return True
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise SchemeError(f"bits must be 2, 3, 4, 8 or 'fp8', got {bits!r}")
    return False


def _qmax(bits: Bits) -> float:
    return FP8_MAX if _is_fp8(bits) else float((1 << (bits - 1)) - 1)


def _scale_torch_dtype(scale_dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(scale_dtype, torch.dtype):
        if scale_dtype not in SCALE_DTYPES.values():
            raise SchemeError(f"unsupported scale dtype {scale_dtype}")
        return scale_dtype
    if scale_dtype not in SCALE_DTYPES:
        raise SchemeError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    return SCALE_DTYPES[scale_dtype]


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 0:
        raise QuantError("cannot quantize a 0-d tensor")
    if w.dim() == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def _group(cols: int, group_size: Optional[int]) -> tuple[int, int]:
    """(effective group length, number of groups) for a row of ``cols`` elements."""
    if group_size is None:
        return max(cols, 1), 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise SchemeError(f"group_size must be a positive int or None, got {group_size!r}")
    return group_size, -(-cols // group_size)


def _grouped(t: torch.Tensor, g: int, n_groups: int) -> torch.Tensor:
    """View a [rows, cols] tensor as [rows, n_groups, g], zero-padding the last group if short."""
    rows, cols = t.shape
    pad = n_groups * g - cols
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(rows, n_groups, g)


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32)
    return torch.where(s == 0, torch.ones_like(s), s)


def _nonfinite_message(name: str, w: torch.Tensor) -> str:
    wf = w.detach()
    n_nan = int(torch.isnan(wf).sum())
    n_inf = int(torch.isinf(wf).sum())
    bad = torch.nonzero(~torch.isfinite(wf.reshape(-1)))
    first = int(bad[0]) if bad.numel() else -1
    return (
        f"{name}: weight contains non-finite values ({n_nan} NaN, {n_inf} Inf, first at "
        f"flat index {first}, shape {tuple(w.shape)}); refusing to quantize"
    )


# --------------------------------------------------------------------------- core


def choose_qparams(
    w: torch.Tensor,
    bits: Bits,
    group_size: Optional[int] = None,
    scale_dtype: Union[str, torch.dtype] = "float32",
    *,
    name: str = "<tensor>",
) -> torch.Tensor:
    """Symmetric scales ``max|W_group| / qmax`` of shape ``[rows, n_groups]`` in ``scale_dtype``.

    ``bits``: 2, 3, 4, 8 (int) or ``"fp8"``.  ``group_size=None``: one scale per row.
    All-zero groups get scale 0.  Raises :class:`NonFiniteWeightError` (naming ``name``)
    on NaN/Inf and :class:`QuantError` if a scale overflows ``scale_dtype``.
    """
    if not w.is_floating_point():
        raise QuantError(f"{name}: expected a floating-point weight, got {w.dtype}")
    qmax = _qmax(bits)
    sdt = _scale_torch_dtype(scale_dtype)
    w2 = _as_2d(w.detach())
    rows, cols = w2.shape
    g, n_groups = _group(cols, group_size)
    if cols == 0:
        return torch.zeros(rows, n_groups, dtype=sdt, device=w.device)
    # abs/max are exact in the stored dtype; only the [rows, n_groups] result goes to fp32.
    amax = _grouped(w2.abs(), g, n_groups).amax(dim=2).to(torch.float32)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise NonFiniteWeightError(_nonfinite_message(name, w))
    scale = (amax / qmax).to(sdt)
    if not bool(torch.isfinite(scale).all()):
        raise QuantError(
            f"{name}: scale overflows {sdt} (max|W| = {float(amax.max()):.6g}, qmax = {qmax:g})"
        )
    return scale


def choose_qparams_affine(
    w: torch.Tensor,
    bits: int,
    group_size: Optional[int] = None,
    scale_dtype: Union[str, torch.dtype] = "float32",
    *,
    name: str = "<tensor>",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max) qparams ``(scale, zero)``, each ``[rows, n_groups]`` in ``scale_dtype``.

    ``lo = min(W_group, 0)``, ``hi = max(W_group, 0)`` (the range always holds 0, so a constant or all-zero
    group is exact), ``scale = (hi - lo) / (2**bits - 1)``, rounded to ``scale_dtype`` first;
    ``zero = -lo / scale`` (float32 division by the rounded scale), then rounded to ``scale_dtype``.  An
    all-zero group gets scale 0 and zero 0 (it dequantizes to zeros).
    """
    if not w.is_floating_point():
        raise QuantError(f"{name}: expected a floating-point weight, got {w.dtype}")
    if isinstance(bits, bool) or bits not in (2, 3, 4):
        raise SchemeError(f"asymmetric qparams need bits 2, 3 or 4, got {bits!r}")
    sdt = _scale_torch_dtype(scale_dtype)
    w2 = _as_2d(w.detach())
    rows, cols = w2.shape
    g, n_groups = _group(cols, group_size)
    if cols == 0:
        z = torch.zeros(rows, n_groups, dtype=sdt, device=w.device)
        return z, z.clone()
    wg = _grouped(w2, g, n_groups)            # zero padding never changes min(., 0) / max(., 0)
    lo = wg.amin(dim=2).to(torch.float32).clamp_max(0)
    hi = wg.amax(dim=2).to(torch.float32).clamp_min(0)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise NonFiniteWeightError(_nonfinite_message(name, w))
    scale = ((hi - lo) / float((1 << bits) - 1)).to(sdt)
    if not bool(torch.isfinite(scale).all()):
        raise QuantError(f"{name}: scale overflows {sdt} (max - min = {float((hi - lo).max()):.6g})")
    zero = torch.where(scale == 0, torch.zeros_like(lo), -lo / _safe_divisor(scale)).to(sdt)
    return scale, zero


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    bits: Bits,
    group_size: Optional[int] = None,
    zero: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantize ``w`` with precomputed ``scale`` (``[rows, n_groups]``, any float dtype).

    Returns a tensor of ``w``'s shape: ``int8`` in ``[-qmax, qmax]`` (round half to even,
    then clamp) for integer bits, ``float8_e4m3fn`` for ``"fp8"``.  Groups with scale 0
    quantize to 0.  With ``zero`` (asymmetric, int bits 2/3/4; same shape as ``scale``):
    ``u = clamp(round_half_even(W / scale + zero), 0, 2**bits - 1)``, returned as the signed
    ``u - 2**(bits-1)`` (int8).
    """
    fp8 = _is_fp8(bits)
    qmax = _qmax(bits)
    w2 = _as_2d(w.detach())
    rows, cols = w2.shape
    g, n_groups = _group(cols, group_size)
    if tuple(scale.shape) != (rows, n_groups):
        raise QuantError(f"scale shape {tuple(scale.shape)} != expected {(rows, n_groups)}")
    x = _grouped(w2.to(torch.float32), g, n_groups) / _safe_divisor(scale).unsqueeze(2)
    if zero is not None:
        if fp8 or bits == 8:
            raise SchemeError(f"zero points need int bits 2, 3 or 4, got {bits!r}")
        if tuple(zero.shape) != (rows, n_groups):
            raise QuantError(f"zero shape {tuple(zero.shape)} != expected {(rows, n_groups)}")
        half = 1 << (bits - 1)
        x = torch.round(x + zero.to(torch.float32).unsqueeze(2)).clamp_(0, 2 * half - 1).sub_(half)
        return x.reshape(rows, n_groups * g)[:, :cols].to(torch.int8).reshape(w.shape)
    x = x.reshape(rows, n_groups * g)[:, :cols]
    if fp8:
        q = x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        q = torch.round(x).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(w.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    zero: Optional[torch.Tensor] = None,
    bits: Optional[int] = None,
) -> torch.Tensor:
    """``W' = q.float() * scale.float()`` (per group), computed in float32, returned as ``dtype``.

    ``q`` is int8 or float8_e4m3fn of any shape (viewed as ``[rows, cols]``).  With ``zero`` (and the
    scheme's ``bits``): ``W' = (q + 2**(bits-1) - zero) * scale``, i.e. ``(u - zero) * scale``.
    """
    q2 = _as_2d(q)
    rows, cols = q2.shape
    g, n_groups = _group(cols, group_size)
    if tuple(scale.shape) != (rows, n_groups):
        raise QuantError(f"scale shape {tuple(scale.shape)} != expected {(rows, n_groups)}")
    s = scale.to(torch.float32).unsqueeze(2)
    x = _grouped(q2.to(torch.float32), g, n_groups)
    if zero is not None:
        if bits not in (2, 3, 4):
            raise SchemeError(f"dequantize with zero points needs bits 2, 3 or 4, got {bits!r}")
        if tuple(zero.shape) != (rows, n_groups):
            raise QuantError(f"zero shape {tuple(zero.shape)} != expected {(rows, n_groups)}")
        x = x + (float(1 << (bits - 1)) - zero.to(torch.float32).unsqueeze(2))
    w = x * s
    w = w.reshape(rows, n_groups * g)[:, :cols]
    return w.reshape(q.shape).to(dtype)


# --------------------------------------------------------------------------- fast block kernel (private)

_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Rows per block of the fast kernel are chosen to give about this many values (float32 buffers of
#: 4 MB, reused across blocks and tensors).
BLOCK_ELEMS = 1 << 20


class _Workspace(threading.local):
    """Per-thread scratch buffers, grown on demand and reused across blocks and tensors (fresh full-size
    temporaries cost more in page faults than the arithmetic on them)."""

    def __init__(self) -> None:
        self.bufs: dict = {}

    def get(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        b = self.bufs.get(key)
        # a buffer made under torch.inference_mode cannot be written outside it: make a new one then
        if (b is None or b.numel() < n or b.dtype != dtype
                or (b.is_inference() and not torch.is_inference_mode_enabled())):
            b = torch.empty(max(n, 1), dtype=dtype)
            self.bufs[key] = b
        return b[:n]


_WS = _Workspace()
_FP8_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _fast_ok(w2: torch.Tensor, scheme: Scheme) -> bool:
    rows, cols = w2.shape
    g = scheme.group_size
    return (not scheme.zero_point and w2.dtype in _FAST_DTYPES and w2.device.type == "cpu" and rows > 0 and cols > 0
            and (g is None or cols % g == 0))


def _quantize_rows_into(w2: torch.Tensor, scheme: Scheme, scale_out: torch.Tensor, qdata_out: torch.Tensor):
    """The fast kernel: quantize the rows ``w2`` ([r, cols], ``_fast_ok``) into ``scale_out`` ([r, n_groups],
    scheme's scale dtype) and ``qdata_out`` (uint8, ``packed_nbytes(r * cols)`` bytes), bit-identical to
    :func:`quantize_tensor`.  The same float32 math as choose_qparams + quantize, done in place on reused
    buffers.  Returns ``(wf, x)``: float32 flat views of the block and of its quantized values (valid until
    the next call on this thread), or ``None`` when the block holds NaN/Inf or a scale overflows (the caller
    then raises through the reference path, which has the error messages)."""
    rows, cols = w2.shape
    n = rows * cols
    bits = scheme.pack_bits
    qmax = scheme.qmax
    g = cols if scheme.group_size is None else scheme.group_size
    ng = cols // g
    vpu = _pack.values_per_unit(bits)
    n_units = -(-n // vpu)
    if w2.dtype == torch.float32 and w2.is_contiguous():
        wf = w2.reshape(-1)
    else:
        wf = _WS.get("wf", n, torch.float32)
        wf.view(rows, cols).copy_(w2)
    x = _WS.get("x", n_units * vpu, torch.float32)
    xn = x[:n]
    # max|W| per group (abs and max are exact, so this equals choose_qparams' amax in the stored dtype).
    amax = torch.abs(wf, out=xn).view(rows, ng, g).amax(dim=2)
    if not bool(torch.isfinite(amax).all()):
        return None
    scale = (amax / qmax).to(scheme.torch_scale_dtype)
    if not bool(torch.isfinite(scale).all()):
        return None
    scale_out.copy_(scale)
    torch.div(wf.view(rows, ng, g), _safe_divisor(scale).unsqueeze(2), out=xn.view(rows, ng, g))
    if scheme.method == "fp8":
        xn.clamp_(-FP8_MAX, FP8_MAX)
    else:
        xn.round_().clamp_(-qmax, qmax)
    _pack.pack_float_into(x, n, bits, qdata_out, _WS.get("pk", n_units, torch.float32),
                          _WS.get("pk32", n_units, torch.int32))
    if scheme.method == "fp8":  # x becomes the fp8 values as float32 (a table lookup; the cast back is slow)
        idx = _WS.get("idx", n, torch.int64)
        idx.copy_(qdata_out)
        torch.index_select(_FP8_TABLE, 0, idx, out=xn)
    return wf, xn


def _dequantize_rows_(x: torch.Tensor, rows: int, cols: int, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """In place: the quantized values ``x`` (float32, flat, from :func:`_quantize_rows_into`) times their
    scales, i.e. ``dequantize``'s float32 result."""
    g = cols if scheme.group_size is None else scheme.group_size
    xv = x.view(rows, cols // g, g)
    xv.mul_(scale.to(torch.float32).unsqueeze(2))
    return x


# --------------------------------------------------------------------------- QTensor


@dataclass
class QTensor:
    """A quantized tensor: packed values + scales + everything needed to restore it.

    qdata: 1-D uint8, the packed stream of ``numel`` values (docs/packed-format.md).
    scale: ``[rows, n_groups]`` in ``scheme.scale_dtype``.
    shape / dtype: the original tensor's shape and dtype.
    zero: the zero points (``scale``'s shape and dtype) of a ``zero_point`` scheme, else None.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    scheme: Scheme
    shape: tuple
    dtype: torch.dtype
    name: Optional[str] = None
    zero: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if len(self.shape) == 0:
            raise QuantError("QTensor shape must have at least one dimension")
        if self.qdata.dtype != torch.uint8 or self.qdata.dim() != 1:
            raise QuantError(
                f"qdata must be a 1-D uint8 tensor, got {self.qdata.dtype} {tuple(self.qdata.shape)}"
            )
        want = _pack.packed_nbytes(self.numel, self.scheme.pack_bits)
        if self.qdata.numel() != want:
            raise QuantError(f"qdata has {self.qdata.numel()} bytes, expected {want}")
        if tuple(self.scale.shape) != self.scale_shape:
            raise QuantError(f"scale shape {tuple(self.scale.shape)} != expected {self.scale_shape}")
        if self.scale.dtype != self.scheme.torch_scale_dtype:
            raise QuantError(f"scale dtype {self.scale.dtype} != scheme's {self.scheme.scale_dtype}")
        if self.scheme.zero_point != (self.zero is not None):
            raise QuantError(f"scheme {self.scheme.name} {'needs' if self.scheme.zero_point else 'has no'} zero "
                             f"points, got {'none' if self.zero is None else 'a zero tensor'}")
        if self.zero is not None and (tuple(self.zero.shape) != self.scale_shape
                                      or self.zero.dtype != self.scale.dtype):
            raise QuantError(f"zero {self.zero.dtype} {tuple(self.zero.shape)} != the scale's "
                             f"{self.scale.dtype} {self.scale_shape}")

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        n = 1
        for d in self.shape[1:] if len(self.shape) > 1 else self.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def n_groups(self) -> int:
        return _group(self.cols, self.scheme.group_size)[1]

    @property
    def scale_shape(self) -> tuple:
        return (self.rows, self.n_groups)

    @property
    def group_padding(self) -> int:
        """Implied zero-padding columns of the last group (0 when the group divides cols)."""
        g = self.scheme.group_size
        return 0 if g is None else self.n_groups * g - self.cols

    def nbytes(self) -> int:
        """Bytes held: packed data + scales (+ zero points)."""
        z = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return self.qdata.numel() + self.scale.numel() * self.scale.element_size() + z

    def unpack(self) -> torch.Tensor:
        """The quantized values (int8 or float8_e4m3fn) in ``[rows, cols]`` shape."""
        q = _pack.unpack(self.qdata, self.scheme.pack_bits, self.numel)
        return q.view(self.rows, self.cols)

    def to(self, device) -> "QTensor":
        return QTensor(self.qdata.to(device), self.scale.to(device), self.scheme, self.shape, self.dtype, self.name,
                       None if self.zero is None else self.zero.to(device))


def quantize_tensor(
    name: str,
    w: torch.Tensor,
    scheme: Scheme,
    *,
    chunk_elems: int = 1 << 24,
) -> QTensor:
    """Quantize and pack ``w`` under ``scheme``.  ``name`` appears in every error message.

    Works in row chunks of about ``chunk_elems`` elements so that float32 temporaries
    stay small even for embedding-sized tensors.
    """
    if not isinstance(scheme, Scheme):
        raise SchemeError(f"{name}: scheme must be a Scheme, got {type(scheme).__name__}")
    if not isinstance(w, torch.Tensor):
        raise QuantError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 0:
        raise QuantError(f"{name}: cannot quantize a 0-d tensor")
    if not w.is_floating_point() or w.dtype == torch.float8_e4m3fn:
        raise QuantError(f"{name}: expected a float weight, got {w.dtype}")
    w = w.detach()
    w2 = _as_2d(w)
    if _fast_ok(w2, scheme):
        qt = _quantize_tensor_fast(name, w, w2, scheme)
        if qt is not None:
            return qt
    bits = scheme.pack_bits
    if scheme.zero_point:
        scale, zero = choose_qparams_affine(w, bits, scheme.group_size, scheme.scale_dtype, name=name)
    else:
        scale, zero = choose_qparams(w, bits, scheme.group_size, scheme.scale_dtype, name=name), None
    return pack_qtensor(name, w, scale, zero, scheme, chunk_elems=chunk_elems)


def pack_qtensor(
    name: str,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    scheme: Scheme,
    *,
    chunk_elems: int = 1 << 24,
) -> QTensor:
    """Quantize ``w`` with given qparams (``scale``, and ``zero`` for a zero-point scheme, both in the
    scheme's scale dtype) and pack it: the last step of every quantizer, RTN or calibrated."""
    bits = scheme.pack_bits
    w2 = _as_2d(w.detach())
    rows, cols = w2.shape
    vpu = _pack.values_per_unit(bits)
    # Chunks of a multiple of `vpu` rows hold a whole number of packing units, so their
    # packed streams concatenate to the packed stream of the whole tensor.
    step = max(vpu, (max(1, chunk_elems // max(cols, 1)) // vpu) * vpu)
    parts = []
    for r0 in range(0, rows, step):
        zb = None if zero is None else zero[r0 : r0 + step]
        q = quantize(w2[r0 : r0 + step], scale[r0 : r0 + step], bits, scheme.group_size, zb)
        parts.append(_pack.pack(q, bits, check=False))
    qdata = parts[0] if len(parts) == 1 else torch.cat(parts)
    return QTensor(qdata, scale, scheme, tuple(w.shape), w.dtype, name, zero)


def _quantize_tensor_fast(name: str, w: torch.Tensor, w2: torch.Tensor, scheme: Scheme) -> Optional[QTensor]:
    """quantize_tensor through the fast kernel, in blocks of whole rows (a multiple of the packing unit, so the
    packed streams of the blocks are consecutive slices of the whole); None when a block fails its checks."""
    rows, cols = w2.shape
    bits = scheme.pack_bits
    vpu, bpu = _pack.values_per_unit(bits), _pack.bytes_per_unit(bits)
    n_groups = 1 if scheme.group_size is None else cols // scheme.group_size
    qdata = torch.empty(_pack.packed_nbytes(rows * cols, bits), dtype=torch.uint8)
    scale = torch.empty(rows, n_groups, dtype=scheme.torch_scale_dtype)
    step = max(vpu, (max(1, BLOCK_ELEMS // cols) // vpu) * vpu)
    for r0 in range(0, rows, step):
        block = w2[r0:r0 + step]
        r = block.shape[0]
        b0 = r0 * cols // vpu * bpu
        nb = _pack.packed_nbytes(r * cols, bits)
        if _quantize_rows_into(block, scheme, scale[r0:r0 + r], qdata[b0:b0 + nb]) is None:
            return None
    return QTensor(qdata, scale, scheme, tuple(w.shape), w.dtype, name)


def dequantize_tensor(qt: QTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Unpack and dequantize to the original shape; ``dtype=None`` gives the original dtype.

    The math is float32 (``q.float() * scale.float()``); pass ``dtype=torch.float32`` to get
    the unrounded result.
    """
    w = dequantize(qt.unpack(), qt.scale, qt.scheme.group_size, dtype or qt.dtype, qt.zero, qt.scheme.bits)
    return w.reshape(qt.shape)


# --------------------------------------------------------------------------- description


def describe(qt: QTensor) -> dict:
    """JSON-serialisable per-tensor description (schema in docs/packed-format.md)."""
    s = qt.scheme
    if s.method == "fp8":
        encoding = "float8_e4m3fn"
    elif s.bits == 8:
        encoding = "int8_twos_complement"
    else:
        encoding = "offset_binary_le"
    return {
        "format_version": FORMAT_VERSION,
        "method": s.method,
        "bits": s.bits,
        "group_size": s.group_size,
        "scale_dtype": s.scale_dtype,
        "scheme": s.name,
        "zero_point": s.zero_point,
        "encoding": encoding,
        "shape": list(qt.shape),
        "dtype": _DTYPE_NAMES.get(qt.dtype, str(qt.dtype).replace("torch.", "")),
        "rows": qt.rows,
        "cols": qt.cols,
        "n_groups": qt.n_groups,
        "group_padding": qt.group_padding,
        "qdata_nbytes": qt.qdata.numel(),
        "scale_shape": list(qt.scale_shape),
    }


def from_description(
    desc: dict, qdata: torch.Tensor, scale: torch.Tensor, name: Optional[str] = None,
    zero: Optional[torch.Tensor] = None,
) -> QTensor:
    """Rebuild a :class:`QTensor` from :func:`describe`'s dict and the stored tensors (``zero`` for a
    zero-point scheme).

    Checks the format version (1 or 2), the scheme, and that the tensors match the description.
    """
    if not isinstance(desc, dict):
        raise SchemeError(f"description must be a dict, got {type(desc).__name__}")
    where = f"{name}: " if name else ""
    version = desc.get("format_version")
    if version not in READ_VERSIONS:
        raise SchemeError(f"{where}unsupported format_version {version!r} (this reader: {READ_VERSIONS})")
    if version == 1 and desc.get("zero_point"):
        raise SchemeError(f"{where}format_version 1 has no zero points")
    keys = ("method", "bits", "group_size", "scale_dtype", "zero_point")
    scheme = Scheme.from_dict({k: desc[k] for k in keys if k in desc})
    dtype_name = desc.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise SchemeError(f"{where}unknown original dtype {dtype_name!r}")
    shape = desc.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SchemeError(f"{where}bad shape {shape!r}")
    try:
        qt = QTensor(qdata.reshape(-1), scale, scheme, tuple(shape), dtype, name, zero)
    except QuantError as e:
        raise QuantError(f"{where}{e}") from None
    for key in ("rows", "cols", "n_groups", "group_padding", "qdata_nbytes"):
        if key in desc:
            have = qt.qdata.numel() if key == "qdata_nbytes" else getattr(qt, key)
            if desc[key] != have:
                raise QuantError(f"{where}description says {key}={desc[key]!r}, tensors give {have!r}")
    return qt
