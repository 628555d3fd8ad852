"""QuantizedLinear: a Linear layer whose weight stays packed in memory, run by torch's own weight-only ops.

A route is picked once per module for the device its data lives on and the activation dtype it will see
(`prepare(dtype)`; the loader calls it for every linear at load, `routes` in `fishlab.model.load` sums them
up). Every route computes ``F.linear(x, W')`` with ``W'`` the dequantized weight:

==================  ======  =====================================================================================
route               device  what runs
==================  ======  =====================================================================================
``int8_gemv``       cpu     INT8 per row, fishlab's own kernel (`fishlab.quant.cgemv`) on the generic INT8
                            stream, float32 scales; more than ``cgemv.MAX_ROWS`` rows: ``_weight_int8pack_mm``.
``int4_gemv``       cpu     INT4 grouped (groups a power of two >= 32, K % 128 == 0, symmetric or zero-point),
                            fishlab's own kernel on the generic INT4 stream (no re-pack); more rows than
                            ``cgemv.MAX_ROWS``: the weight dequantized by the kernel for that call + ``F.linear``.
``int8_mm``         cpu,    INT8 per row: ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])``; the generic
                    cuda    packed INT8 stream *is* that row-major int8 matrix (a zero-copy view).
``int4_mm``         cpu     INT4, groups 32..256 dividing K, N % 16 == 0: the weight is packed by torch's own
                            ``aten._convert_weight_to_int4pack_for_cpu`` (its layout depends on the CPU's
                            instruction set, so fishlab never builds or reads it by hand) and run by
                            ``aten._weight_int4pack_mm_for_cpu``.
``int4_tinygemm``   cuda    the same scheme on sm80+: ``aten._convert_weight_to_int4pack`` (input: [N, K/2]
                            uint8, the even column in the high nibble) and ``aten._weight_int4pack_mm``.
``fp8_scaled_mm``   cuda    FP8 e4m3 per row on sm89+: ``torch._scaled_mm`` with the activation quantized to
                            e4m3 per row (amax / 448) and the weight's row scales (W8A8: not bit-equal to the
                            dequantized model, see `gpu_check` for the measured difference).
``dense``           any     no fast kernel for this scheme / device / dtype: the weight is dequantized ONCE, in the
                            activation dtype, and kept (a non-persistent buffer ``w_dense``: the memory of a plain
                            linear, counted by ``nbytes``); forward is ``F.linear``.
``dequant``         any     dequantize in every forward (``use_kernels=False``, the reference path; also taken,
                            with a warning, when a prepared module sees another dtype or device).
==================  ======  =====================================================================================

On the CPU the own kernels (``*_gemv``) are taken when they built (a C compiler is needed, see
`fishlab.quant.cgemv`); otherwise torch's ops, and the reason is logged once. The activation dtype matters on the
CPU: the int8 / int4 kernels are fast in bfloat16 only. Measured on a 2-core
AVX-512 machine, batch 1, 9728 x 2560 (ms): bf16 dense 2.66, int8_mm 1.08, int4_mm 0.67; float32 dense 5.93,
int8_mm 13.2, int4_mm 21.8; float16 dense 1.31, int8_mm 14.8, int4_mm 24.3. So on the CPU the kernels are the
route for bfloat16 activations, and float32 / float16 models take ``dense``.

The kernel's operands are built at prepare time (``kscale``: scales in the activation dtype, or the int4 ops'
``scales_and_zeros [K/g, N, 2]`` with zero 0, since our symmetric q in [-7, 7] maps exactly to the ops' u = q + 8
with ``W' = (u - 8) * scale + zero``). A zero-point INT4 weight (``W' = (u - z) * scale``) takes the same ops
with the ops' zero ``(8 - z) * scale``, computed in float32 and rounded to the activation dtype (so those routes
differ from the dequantized weight by that rounding, within the routes' tolerance). Device-packed INT4 replaces the generic stream (same byte count); it is read
back exactly through the op itself (one-hot activations, see `_int4_values_via_op`) when a generic copy is needed
(`to_qtensor`, a device move), slow but layout-agnostic and checked by re-packing.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cgemv
from . import pack as _pack
from .primitives import FP8_MAX, QTensor, Scheme, dequantize, quantize_tensor

__all__ = ["QuantizedLinear", "Linear", "float_linear", "float_route", "plan_route", "cuda_route", "tinygemm_input", "ROUTES", "KERNEL_ROUTES"]

log = logging.getLogger("fishlab.qlinear")

ROUTES = ("int8_gemv", "int4_gemv", "int8_mm", "int4_mm", "int4_tinygemm", "fp8_scaled_mm", "dense", "dequant")
KERNEL_ROUTES = ("int8_gemv", "int4_gemv", "int8_mm", "int4_mm", "int4_tinygemm", "fp8_scaled_mm")

LAYOUT_GENERIC = "generic"
LAYOUT_CPU_INT4PACK = "cpu_int4pack"      # aten._convert_weight_to_int4pack_for_cpu output
LAYOUT_CUDA_INT4PACK = "cuda_int4pack"    # aten._convert_weight_to_int4pack output (tinygemm)

_INT4_GROUPS = (32, 64, 128, 256)
_READBACK_ROWS = 256                      # one-hot activation rows per op call when reading int4 back


# ----------------------------------------------------------------------------------------------------
# route planning: which kernel a (scheme, shape, device, dtype) gets
# ----------------------------------------------------------------------------------------------------

def _is_int8_row(s: Scheme) -> bool:
    return s.method == "int" and s.bits == 8 and s.group_size is None


def _is_int4_grouped(s: Scheme, N: int, K: int, n_multiple: int) -> bool:
    g = s.group_size
    return (s.method == "int" and s.bits == 4 and g in _INT4_GROUPS and K % g == 0 and N > 0
            and N % n_multiple == 0)


def _tinygemm_inner_k_tiles(K: int) -> int | None:
    """tinygemm needs K % (innerKTiles * 16) == 0 with innerKTiles in {2, 4, 8}; the largest that fits."""
    return next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)


_OP_OK: dict[tuple, bool] = {}


def _op_works(route: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build runs `route`'s op on `device` with `dtype` activations: tried once on a tiny
    input (a CPU-only or an older torch lacks some of them), cached per (route, device, dtype)."""
    key = (route, str(device), dtype)
    if key not in _OP_OK:
        try:
            x = torch.zeros(1, 256, dtype=dtype, device=device)
            if route == "int8_mm":
                torch.ops.aten._weight_int8pack_mm(x, torch.zeros(32, 256, dtype=torch.int8, device=device),
                                                   torch.ones(32, dtype=dtype, device=device))
            elif route in ("int4_mm", "int4_tinygemm"):
                q = torch.zeros(32, 256, dtype=torch.int8, device=device)
                packed = _pack_int4_for_device(q, device)
                sz = torch.zeros(2, 32, 2, dtype=dtype, device=device)
                _int4_mm(x, packed, 128, sz, device)
            elif route == "fp8_scaled_mm":
                w = torch.zeros(32, 256, dtype=torch.float8_e4m3fn, device=device)
                _fp8_mm(x, w, torch.ones(1, 32, dtype=torch.float32, device=device))
            else:
                raise ValueError(route)
            _OP_OK[key] = True
        except Exception as e:  # the op is missing or refuses this device/dtype: the route is not offered
            log.info("fishlab: %s unavailable on %s with %s activations (%s: %s)", route, device,
                     str(dtype).replace("torch.", ""), type(e).__name__, str(e).splitlines()[0][:200])
            _OP_OK[key] = False
    return _OP_OK[key]


def plan_route(scheme: Scheme, shape: tuple, device: torch.device | str, dtype: torch.dtype) -> str:
    """The route a linear of `shape` [N, K] under `scheme` takes on `device` with `dtype` activations: one of
    the kernel routes where torch has a fast op for it, else "dense" (dequantized once)."""
    device = torch.device(device)
    N, K = shape
    if device.type == "cpu":
        if dtype != torch.bfloat16:        # the CPU kernels are slower than a dense matmul in fp32 / fp16
            return "dense"
        own = cgemv.available()
        if own and _is_int8_row(scheme) and _op_works("int8_mm", device, dtype):
            return "int8_gemv"
        if (own and scheme.method == "int" and scheme.bits == 4 and scheme.group_size is not None
                and cgemv.int4_ok(K, scheme.group_size)):
            return "int4_gemv"
        if _is_int8_row(scheme) and _op_works("int8_mm", device, dtype):
            return "int8_mm"
        if _is_int4_grouped(scheme, N, K, 16) and _op_works("int4_mm", device, dtype):
            return "int4_mm"
        return "dense"
    if device.type == "cuda":
        return cuda_route(scheme, N, K, dtype, torch.cuda.get_device_capability(device),
                          lambda r: _op_works(r, device, dtype))
    return "dense"


def cuda_route(scheme: Scheme, N: int, K: int, dtype: torch.dtype, capability: tuple[int, int], works) -> str:
    """plan_route's CUDA rule, a pure function of the GPU's compute capability and `works(route) -> bool` (does
    this torch run the op): INT8 per row -> int8_mm (bf16 / fp16); INT4 g32..256, N % 8 == 0, bf16, sm80+ ->
    int4_tinygemm; FP8 per row, K and N multiples of 16, sm89+ -> fp8_scaled_mm; otherwise dense."""
    if _is_int8_row(scheme) and dtype in (torch.bfloat16, torch.float16) and works("int8_mm"):
        return "int8_mm"
    if (_is_int4_grouped(scheme, N, K, 8) and dtype == torch.bfloat16 and capability >= (8, 0)
            and _tinygemm_inner_k_tiles(K) and works("int4_tinygemm")):
        return "int4_tinygemm"
    if (scheme.method == "fp8" and scheme.group_size is None and capability >= (8, 9) and K % 16 == 0
            and N % 16 == 0 and dtype in (torch.bfloat16, torch.float16, torch.float32) and works("fp8_scaled_mm")):
        return "fp8_scaled_mm"
    return "dense"


# ----------------------------------------------------------------------------------------------------
# the ops (thin wrappers; torch's kernels do the work)
# ----------------------------------------------------------------------------------------------------

def _pack_int4_for_device(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """q [N, K] int8 in [-8, 7] -> the int4 kernel's packed weight on `device`, by torch's conversion op."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)                       # u = q + 8 in [0, 15]
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)
    return torch.ops.aten._convert_weight_to_int4pack(tinygemm_input(u), _tinygemm_inner_k_tiles(q.size(1)))


def tinygemm_input(u: torch.Tensor) -> torch.Tensor:
    """u [N, K] uint8 in [0, 15] -> the input `aten._convert_weight_to_int4pack` takes since torch 2.5: [N, K/2]
    uint8, two values per byte, the even column in the high nibble (a serialisation format, the same on every
    GPU; the op builds its own compute layout from it)."""
    return ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()


def _int4_mm(x2: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor, device: torch.device):
    if device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x2, packed, group, sz)


def _fp8_mm(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] (any float dtype) @ (w [N, K] e4m3 * w_scale [1, N]).T via torch._scaled_mm, the activation
    quantized per row to e4m3 (amax / 448); result in x2's dtype."""
    xf = x2.float()
    a_scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX          # [M, 1]
    xq = (xf / a_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    return y.to(x2.dtype)


def _int4_values_via_op(packed: torch.Tensor, N: int, K: int, group: int) -> torch.Tensor:
    """q [N, K] int8 read back from a device-packed INT4 weight through the matmul op itself: one-hot bf16
    activations with scale 1 and zero 0 give (u - 8) exactly (small integers). Layout-agnostic; slow
    (K / 256 op calls), for conversions and tests, never for forward."""
    dev = packed.device
    sz = torch.stack([torch.ones(K // group, N), torch.zeros(K // group, N)], dim=-1)
    sz = sz.to(device=dev, dtype=torch.bfloat16).contiguous()
    q = torch.empty(N, K, dtype=torch.int8, device=dev)
    for k0 in range(0, K, _READBACK_ROWS):
        k1 = min(K, k0 + _READBACK_ROWS)
        eye = torch.zeros(k1 - k0, K, dtype=torch.bfloat16, device=dev)
        eye[torch.arange(k1 - k0, device=dev), torch.arange(k0, k1, device=dev)] = 1
        q[:, k0:k1] = _int4_mm(eye, packed, group, sz, dev).t().to(torch.int8)
    if not torch.equal(_pack_int4_for_device(q, dev), packed):        # proof the read-back is exact
        raise RuntimeError(f"int4 read-back through the op did not reproduce the packed weight ({N}x{K})")
    return q


# ----------------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """``y = x @ W'^T + b`` with ``W'`` kept packed (see the module docstring for the routes).

    Buffers: ``qdata`` (packed weight: the generic stream, or the device's int4 kernel layout), ``scale`` (as
    stored), optional ``bias``; after `prepare`, ``kscale`` (the kernel's scale operand) or ``w_dense`` (the
    dequantized weight of the ``dense`` route), both non-persistent.
    """

    def __init__(self, qt: QTensor, bias: Optional[torch.Tensor] = None, *, use_kernels: bool = True,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D weight, got shape {qt.shape}")
        self.out_features, self.in_features = qt.shape
        self.scheme: Scheme = qt.scheme
        self.weight_dtype: torch.dtype = qt.dtype
        self.name = qt.name
        self.use_kernels = use_kernels
        self.layout = LAYOUT_GENERIC
        self.compute_dtype: torch.dtype | None = None     # set by prepare()
        self.route_name: str | None = None
        self._warned = False
        self.register_buffer("qdata", qt.qdata)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero", qt.zero)                     # zero points of a zero-point scheme, else None
        self.register_buffer("kscale", None, persistent=False)
        self.register_buffer("kzero", None, persistent=False)             # int4_gemv: scale * (zero + 128)
        self.register_buffer("w_dense", None, persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None
        if compute_dtype is not None:
            self.prepare(compute_dtype)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: Optional[torch.Tensor] = None, *, use_kernels: bool = True,
                     compute_dtype: Optional[torch.dtype] = None) -> "QuantizedLinear":
        return cls(qt, bias, use_kernels=use_kernels, compute_dtype=compute_dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: Scheme, *, name: Optional[str] = None,
                   use_kernels: bool = True, compute_dtype: Optional[torch.dtype] = None) -> "QuantizedLinear":
        """Quantize ``linear.weight`` under ``scheme`` (``name`` is used in error messages)."""
        qt = quantize_tensor(name or "linear.weight", linear.weight.detach(), scheme)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qt, bias, use_kernels=use_kernels, compute_dtype=compute_dtype)

    # -- route and kernel operands ----------------------------------------------------

    def prepare(self, dtype: torch.dtype) -> str:
        """Pick the route for activations of `dtype` on this module's device and build its operands (int4
        weights re-packed by torch's op, kernel scales, or the dense weight). Returns the route."""
        if self.compute_dtype is not None:
            self._unprepare()
        dev = self.qdata.device
        N, K = self.out_features, self.in_features
        route = plan_route(self.scheme, (N, K), dev, dtype) if self.use_kernels else "dequant"
        if route == "int8_gemv":                                      # float32 scales (a view when stored so)
            self.kscale = self.scale.reshape(N).to(torch.float32).contiguous()
        elif route == "int4_gemv":                                    # [N, K/g] float32 scale, scale*(zero+128)
            s = self.scale.to(torch.float32).contiguous()
            z = 8.0 if self.zero is None else self.zero.to(torch.float32)
            self.kscale = s
            self.kzero = (s * (z + 128.0)).contiguous()
        elif route == "int8_mm":
            self.kscale = self.scale.reshape(N).to(dtype)
        elif route in ("int4_mm", "int4_tinygemm"):
            q = self._q()
            self.qdata = _pack_int4_for_device(q, dev)               # replaces the generic stream
            self.layout = LAYOUT_CPU_INT4PACK if dev.type == "cpu" else LAYOUT_CUDA_INT4PACK
            s = self.scale.to(dtype).t()                              # [K/g, N]
            if self.zero is None:
                z = torch.zeros_like(s)
            else:                                                     # (u - z) s = (u - 8) s + (8 - z) s
                z = ((8 - self.zero.float()) * self.scale.float()).to(dtype).t()
            self.kscale = torch.stack([s, z], dim=-1).contiguous()
        elif route == "fp8_scaled_mm":
            self.kscale = self.scale.to(torch.float32).reshape(1, N)
        elif route == "dense":
            self.w_dense = self.dequantized_weight(dtype)
        self.compute_dtype, self.route_name = dtype, route
        return route

    def _unprepare(self) -> None:
        """Back to the generic packed stream, no kernel operands (exact)."""
        if self.layout != LAYOUT_GENERIC:
            self.qdata = _pack.pack(self._q(), 4, check=False)
            self.layout = LAYOUT_GENERIC
        self.kscale = None
        self.kzero = None
        self.w_dense = None
        self.compute_dtype = self.route_name = None

    def route(self, x: torch.Tensor) -> str:
        """The route ``forward(x)`` takes: the prepared one when x has the prepared dtype and device (an
        unprepared module would prepare for x), else "dequant"."""
        if self.compute_dtype is None:
            if x.device != self.qdata.device:
                return "dequant"
            return plan_route(self.scheme, (self.out_features, self.in_features), x.device, x.dtype) \
                if self.use_kernels else "dequant"
        if x.dtype == self.compute_dtype and x.device == self.qdata.device:
            return self.route_name
        return "dequant"

    # -- accessors ------------------------------------------------------------------

    def _q(self) -> torch.Tensor:
        """Quantized values as ``[N, K]`` int8 / float8."""
        N, K = self.out_features, self.in_features
        if self.layout != LAYOUT_GENERIC:
            return _int4_values_via_op(self.qdata, N, K, self.scheme.group_size)
        return _pack.unpack(self.qdata, self.scheme.pack_bits, N * K).view(N, K)

    def to_qtensor(self) -> QTensor:
        """The weight as a :class:`QTensor` in the generic packed format (for checkpoints)."""
        qdata = self.qdata if self.layout == LAYOUT_GENERIC else _pack.pack(self._q(), 4, check=False)
        return QTensor(qdata, self.scale, self.scheme, (self.out_features, self.in_features), self.weight_dtype,
                       self.name, self.zero)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W'`` as a fresh ``[out, in]`` tensor (float32 math, cast to ``dtype``)."""
        return dequantize(self._q(), self.scale, self.scheme.group_size, dtype, self.zero, self.scheme.bits)

    def nbytes(self) -> int:
        """Bytes held by this module: packed weight, scales, bias, and the prepared route's operands
        (``kscale``, ``kzero``, or ``w_dense`` for the dense route); a buffer that is a view of another (float32
        scales used as they are stored) counts once."""
        seen, total = set(), 0
        for b in self.buffers():                   # a kernel operand may be a view of the stored scales
            key = b.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += b.numel() * b.element_size()
        return total

    # -- forward --------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None and x.device == self.qdata.device:
            self.prepare(x.dtype)
        route = self.route(x)
        N, K = self.out_features, self.in_features
        if route == "dense":
            return F.linear(x, self.w_dense, None if self.bias is None else self.bias.to(x.dtype))
        if route == "dequant":
            if self.route_name not in (None, "dequant") and not self._warned:
                self._warned = True
                log.warning("fishlab: %s prepared for %s on %s, called with %s on %s: dequantizing in forward "
                            "(slow)", self.name, self.compute_dtype, self.qdata.device, x.dtype, x.device)
            w = self.dequantized_weight(x.dtype).to(x.device)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        few = x2.shape[0] <= cgemv.MAX_ROWS
        if route == "int8_gemv":
            q = self.qdata.view(torch.int8).view(N, K)
            y = cgemv.linear_int8(x2, q, self.kscale) if few else \
                torch.ops.aten._weight_int8pack_mm(x2, q, self.kscale.to(x2.dtype))
        elif route == "int4_gemv":
            g = self.scheme.group_size
            if few:
                y = cgemv.linear_int4(x2, self.qdata, self.kscale, self.kzero, N, K, g)
            else:                                                     # compute-bound: dequantize for this call
                z = self.zero.to(torch.float32).contiguous() if self.zero is not None \
                    else torch.full_like(self.kscale, 8.0)
                y = F.linear(x2, cgemv.dequant_int4(self.qdata, self.kscale, z, N, K, g))
        elif route == "int8_mm":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qdata.view(torch.int8).view(N, K), self.kscale)
        elif route == "fp8_scaled_mm":
            y = _fp8_mm(x2, self.qdata.view(torch.float8_e4m3fn).view(N, K), self.kscale)
        else:  # int4_mm / int4_tinygemm
            y = _int4_mm(x2, self.qdata, self.scheme.group_size, self.kscale, x2.device)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, N)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)`` / ``.half()`` would re-round the scales and break the scheme's scale dtype:
        # device moves apply, dtype changes to the scales do not. A prepared module whose device or float
        # dtype changes is re-prepared (a device-packed int4 weight goes back to the generic stream first,
        # since its layout belongs to the old device).
        old = self.compute_dtype
        probe = fn(torch.empty(0, dtype=old or torch.float32, device=self.qdata.device))
        changed = old is not None and (probe.device != self.qdata.device or probe.dtype != old)
        if changed:
            self._unprepare()
        scale, zero = self.scale, self.zero
        super()._apply(fn, recurse)
        self.scale = scale.to(self.qdata.device)
        self.zero = None if zero is None else zero.to(self.qdata.device)
        if changed:
            self.prepare(probe.dtype)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"route={self.route_name}, layout={self.layout}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------------
# float linears: the same batch-1 rule for plain bf16 weights
# ----------------------------------------------------------------------------------------------------

def float_route(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> str:
    """"bf16_gemv" (fishlab's own kernel) for bf16 x with at most `cgemv.MAX_ROWS` rows and a row-contiguous
    bf16 weight on the CPU, no bias, kernels built; else "F.linear"."""
    if (bias is None and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1 and w.stride(0) == w.shape[1]
            and x.numel() <= cgemv.MAX_ROWS * w.shape[1] and cgemv.available()):
        return "bf16_gemv"
    return "F.linear"


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``, through fishlab's bf16 GEMV where `float_route` says so (decode on the CPU)."""
    if float_route(x, w, bias) == "bf16_gemv":
        return cgemv.linear_bf16(x, w)
    return F.linear(x, w, bias)


class Linear(nn.Linear):
    """The model's float linear: an ``nn.Linear`` (same parameters and state dict) whose forward is
    `float_linear`, so a bf16 model decoding on the CPU reads its weights at memory speed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias)
