"""QuantizedLinear: a Linear layer whose weight stays packed in memory.

Routes for ``forward`` (all compute ``F.linear(x, W')`` with ``W'`` the dequantized weight):

* **INT8 per-row, CPU**: ``torch.ops.aten._weight_int8pack_mm(x2d, w_int8[N, K], scales[N])``.
  The generic packed stream of INT8 *is* a row-major int8 ``[N, K]`` matrix, so the op reads
  the stored buffer directly (zero-copy view).  Scales are cast to the activation dtype (the
  op requires it).
* **INT4 with group 32/64/128/256 dividing K, N % 16 == 0, CPU**: the weight is stored *only*
  in the layout of ``aten._convert_weight_to_int4pack_for_cpu`` (``[N, K/2]`` uint8, same byte
  count as the generic stream, which it replaces).  The op is asymmetric uint4:
  ``W' = (u - 8) * scale + zero`` with ``u in [0, 15]``; our symmetric ``q in [-7, 7]`` maps
  exactly to ``u = q + 8`` and ``zero = 0.0`` (i.e. integer zero point 8).  ``scales_and_zeros``
  (``[K/group, N, 2]`` in the activation dtype) is built per call from the stored scales.
* **Everything else** (FP8, INT2/3, other groupings, CUDA and other devices, unsupported
  activation dtypes): dequantize in forward -- unpack, multiply by the scales in float32,
  cast to the activation dtype, ``F.linear``.  The dequantized weight is a temporary.

Memory: buffers are the packed weight, the scales and the optional bias -- never a
dequantized copy.  ``nbytes()`` reports exactly those bytes.

The in-memory INT4 kernel layout is an implementation detail: write checkpoints from
``to_qtensor()`` (which converts back to the generic format), not from ``state_dict()``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import pack as _pack
from .primitives import QTensor, Scheme, dequantize, quantize_tensor

__all__ = ["QuantizedLinear", "int4pack_cpu_available"]

LAYOUT_GENERIC = "generic"
LAYOUT_CPU_INT4PACK = "cpu_int4pack"

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT4_GROUPS = (32, 64, 128, 256)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------- int4 kernel layout


def _int4pack_from_u(u: torch.Tensor) -> torch.Tensor:
    """Our reconstruction of ``_convert_weight_to_int4pack_for_cpu``'s layout (pure torch).

    ``u``: ``[N, K]`` uint8 in [0, 15].  Rows go in blocks of 32; inside a block, byte
    ``(k, n)`` (k-major) holds ``u[n, k]`` in the low nibble and ``u[n + 16, k]`` in the high
    nibble.  A final block of 16 rows holds ``u[2j, k] | u[2j+1, k] << 4`` for j in 0..7.
    """
    N, K = u.shape
    nb = N // 32
    parts = []
    if nb:
        blk = u[: nb * 32].reshape(nb, 2, 16, K)
        parts.append((blk[:, 0] | (blk[:, 1] << 4)).transpose(1, 2).reshape(-1))
    if N % 32:
        rest = u[nb * 32 :].transpose(0, 1).reshape(K, 8, 2)
        parts.append((rest[..., 0] | (rest[..., 1] << 4)).reshape(-1))
    return torch.cat(parts).reshape(N, K // 2)


def _u_from_int4pack(p: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of :func:`_int4pack_from_u`: ``[N, K]`` uint8 in [0, 15]. Works on any device."""
    flat = p.reshape(-1)
    nb = N // 32
    parts = []
    if nb:
        b = flat[: nb * 32 * K // 2].reshape(nb, K, 16)
        lo, hi = b & 0xF, b >> 4
        parts.append(torch.stack([lo, hi], dim=1).transpose(2, 3).reshape(nb * 32, K))
    if N % 32:
        b = flat[nb * 32 * K // 2 :].reshape(K, 8)
        parts.append(torch.stack([b & 0xF, b >> 4], dim=2).reshape(K, 16).transpose(0, 1))
    return torch.cat(parts, dim=0)


_INT4PACK_OK: Optional[bool] = None


def int4pack_cpu_available() -> bool:
    """True if the CPU int4 ops exist *and* their packed layout matches our reconstruction.

    Checked once per process on a small probe (48 x 256, covering both block kinds), so a
    torch version with a different layout silently falls back to the generic path.
    """
    global _INT4PACK_OK
    if _INT4PACK_OK is None:
        ok = _has_op("_convert_weight_to_int4pack_for_cpu") and _has_op("_weight_int4pack_mm_for_cpu")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                u = torch.randint(0, 16, (48, 256), generator=g, dtype=torch.uint8)
                ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)
                mine = _int4pack_from_u(u)
                ok = (
                    ref.dtype == torch.uint8
                    and tuple(ref.shape) == (48, 128)
                    and torch.equal(ref, mine)
                    and torch.equal(_u_from_int4pack(ref, 48, 256), u)
                )
            except Exception:
                ok = False
        _INT4PACK_OK = bool(ok)
    return _INT4PACK_OK


def _int4_kernel_eligible(qt: QTensor) -> bool:
    s = qt.scheme
    return (
        s.method == "int"
        and s.bits == 4
        and s.group_size in _INT4_GROUPS
        and len(qt.shape) == 2
        and qt.cols % s.group_size == 0
        and qt.rows % 16 == 0
        and qt.rows > 0
    )


# ----------------------------------------------------------------- module


class QuantizedLinear(nn.Module):
    """``y = x @ W'^T + b`` with ``W'`` kept packed (see module docstring for the routes)."""

    def __init__(
        self,
        qt: QTensor,
        bias: Optional[torch.Tensor] = None,
        *,
        use_kernels: bool = True,
    ) -> None:
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D weight, got shape {qt.shape}")
        self.out_features, self.in_features = qt.shape
        self.scheme: Scheme = qt.scheme
        self.weight_dtype: torch.dtype = qt.dtype
        self.name = qt.name
        self.use_kernels = use_kernels
        self.layout = LAYOUT_GENERIC
        self._int4_sz: torch.Tensor | None = None   # the int4 op's scales_and_zeros for the last activation dtype
        qdata = qt.qdata
        if (
            use_kernels
            and qdata.device.type == "cpu"
            and _int4_kernel_eligible(qt)
            and int4pack_cpu_available()
        ):
            u = (qt.unpack().view(torch.uint8) + 8).to(torch.int32)  # q in [-7,7] -> u in [1,15]
            qdata = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
            del u
            self.layout = LAYOUT_CPU_INT4PACK
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", qt.scale)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_qtensor(
        cls, qt: QTensor, bias: Optional[torch.Tensor] = None, *, use_kernels: bool = True
    ) -> "QuantizedLinear":
        return cls(qt, bias, use_kernels=use_kernels)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        scheme: Scheme,
        *,
        name: Optional[str] = None,
        use_kernels: bool = True,
    ) -> "QuantizedLinear":
        """Quantize ``linear.weight`` under ``scheme`` (``name`` is used in error messages)."""
        qt = quantize_tensor(name or "linear.weight", linear.weight.detach(), scheme)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qt, bias, use_kernels=use_kernels)

    # -- accessors ------------------------------------------------------------------

    def _generic_qdata(self) -> torch.Tensor:
        if self.layout == LAYOUT_CPU_INT4PACK:
            u = _u_from_int4pack(self.qdata, self.out_features, self.in_features)
            q = (u - 8).view(torch.int8)
            return _pack.pack(q, 4, check=False)
        return self.qdata

    def to_qtensor(self) -> QTensor:
        """The weight as a :class:`QTensor` in the generic packed format (for checkpoints)."""
        return QTensor(
            self._generic_qdata(),
            self.scale,
            self.scheme,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.name,
        )

    def _q(self) -> torch.Tensor:
        """Quantized values as ``[N, K]`` int8 / float8."""
        N, K = self.out_features, self.in_features
        if self.layout == LAYOUT_CPU_INT4PACK:
            return (_u_from_int4pack(self.qdata, N, K) - 8).view(torch.int8)
        return _pack.unpack(self.qdata, self.scheme.pack_bits, N * K).view(N, K)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W'`` as a fresh ``[out, in]`` tensor (float32 math, cast to ``dtype``)."""
        return dequantize(self._q(), self.scale, self.scheme.group_size, dtype)

    def nbytes(self) -> int:
        """Bytes held by this module: packed weight + scales + bias, plus the int4 kernel's cached
        scales_and_zeros when it has been built."""
        sz = 0 if self._int4_sz is None else self._int4_sz.numel() * self._int4_sz.element_size()
        return sum(b.numel() * b.element_size() for b in self.buffers()) + sz

    def route(self, x: torch.Tensor) -> str:
        """Which forward path ``x`` would take: ``int8_mm``, ``int4_mm`` or ``dequant``."""
        if not self.use_kernels or x.device.type != "cpu" or self.qdata.device.type != "cpu":
            return "dequant"
        if x.dtype not in _KERNEL_DTYPES:
            return "dequant"
        if self.layout == LAYOUT_CPU_INT4PACK:
            return "int4_mm"
        s = self.scheme
        if s.method == "int" and s.bits == 8 and s.group_size is None and _has_op("_weight_int8pack_mm"):
            return "int8_mm"
        return "dequant"

    # -- forward --------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route(x)
        N, K = self.out_features, self.in_features
        if route == "dequant":
            w = self.dequantized_weight(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, w, bias)

        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if route == "int8_mm":
            w = self.qdata.view(torch.int8).view(N, K)
            y = torch.ops.aten._weight_int8pack_mm(x2, w, self.scale.reshape(N).to(x.dtype))
        else:  # int4_mm
            g = self.scheme.group_size
            sz = self._int4_sz
            if sz is None or sz.dtype != x.dtype:   # built once per activation dtype, not per forward
                s = self.scale.to(x.dtype).t()  # [K/g, N]
                sz = self._int4_sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qdata, g, sz)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, N)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)`` / ``.half()`` would re-round the scales and break the scheme's
        # scale dtype; device moves apply, dtype changes to the scales do not.
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.qdata.device)
        self._int4_sz = None
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.name}, layout={self.layout}, bias={self.bias is not None}"
        )
