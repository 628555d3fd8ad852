"""Bit packing of quantized values into dense byte streams.

The layout is specified in ``docs/packed-format.md``; in short:

* The values of a tensor are taken in row-major (C) order as one flat stream
  and packed into a 1-D ``uint8`` tensor.
* ``bits == 8``: int8 two's complement, one value per byte (a bit view).
* ``bits == "fp8"``: float8_e4m3fn, one value per byte (a bit view).
* ``bits in (2, 3, 4)``: offset binary, ``u = q + 2**(bits-1)`` (so
  ``q in [-2**(bits-1), 2**(bits-1)-1]`` maps to ``u in [0, 2**bits-1]``),
  packed little-endian: value ``k`` of a packing unit occupies bits
  ``[k*bits, (k+1)*bits)`` of the unit, the unit's bytes are little-endian.

  ====  =====================  ======================
  bits  unit                   bytes per unit
  ====  =====================  ======================
  4     2 values               1
  2     4 values               1
  3     8 values (24 bits)     3
  ====  =====================  ======================

* A trailing partial unit is padded with the bit pattern ``0``; readers must
  ignore padding values (``unpack`` takes the true element count).

All functions are vectorised torch code working on ``uint8`` intermediates,
so packing hundreds of millions of values takes seconds at most.
"""

from __future__ import annotations

import sys
from typing import Union

import torch

__all__ = [
    "BITS",
    "PackError",
    "pack",
    "unpack",
    "packed_nbytes",
    "values_per_unit",
    "bytes_per_unit",
]

Bits = Union[int, str]

#: The accepted ``bits`` arguments.
BITS = (2, 3, 4, 8, "fp8")

_UNIT = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1), "fp8": (1, 1)}


class PackError(ValueError):
    """Bad arguments to :func:`pack` / :func:`unpack`."""


def _check_bits(bits: Bits) -> Bits:
    if isinstance(bits, bool) or bits not in _UNIT:
        raise PackError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def values_per_unit(bits: Bits) -> int:
    """Number of values in one packing unit (4 for INT2, 8 for INT3, 2 for INT4, 1 otherwise)."""
    return _UNIT[_check_bits(bits)][0]


def bytes_per_unit(bits: Bits) -> int:
    """Number of bytes in one packing unit (3 for INT3, 1 otherwise)."""
    return _UNIT[_check_bits(bits)][1]


def packed_nbytes(numel: int, bits: Bits) -> int:
    """Length in bytes of the packed stream of ``numel`` values: whole units, ``ceil(numel/vpu)*bpu``."""
    vpu, bpu = _UNIT[_check_bits(bits)]
    if numel < 0:
        raise PackError(f"numel must be >= 0, got {numel}")
    return -(-numel // vpu) * bpu


def pack(q: torch.Tensor, bits: Bits, *, check: bool = True) -> torch.Tensor:
    """Pack the values of ``q`` (any shape, row-major order) into a 1-D ``uint8`` tensor.

    ``q`` must be ``int8`` for integer widths (values in ``[-2**(bits-1), 2**(bits-1)-1]``;
    with ``check=True`` out-of-range values raise :class:`PackError`) and
    ``float8_e4m3fn`` for ``bits="fp8"``.  The result lives on ``q``'s device.
    """
    _check_bits(bits)
    if bits == "fp8":
        if q.dtype != torch.float8_e4m3fn:
            raise PackError(f"pack(bits='fp8') needs a float8_e4m3fn tensor, got {q.dtype}")
        return q.contiguous().reshape(-1).view(torch.uint8).clone()
    if q.dtype != torch.int8:
        raise PackError(f"pack(bits={bits}) needs an int8 tensor, got {q.dtype}")
    flat = q.contiguous().reshape(-1)
    if bits == 8:
        return flat.view(torch.uint8).clone()

    half = 1 << (bits - 1)
    if check and flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -half or hi > half - 1:
            raise PackError(
                f"values out of range for {bits}-bit packing: min {lo}, max {hi}, "
                f"allowed [{-half}, {half - 1}]"
            )
    vpu, _ = _UNIT[bits]
    n = flat.numel()
    n_units = -(-n // vpu)
    # Offset binary in uint8: two's complement int8 + half, wrapping, equals q + half.
    u = flat.view(torch.uint8) + half
    if n_units * vpu != n:
        u = torch.cat([u, u.new_zeros(n_units * vpu - n)])  # padding bit pattern 0
    u = u.view(n_units, vpu)

    if bits == 4:
        return (u[:, 0] | (u[:, 1] << 4)).contiguous()
    if bits == 2:
        return (u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)).contiguous()
    # bits == 3: 8 values -> 24-bit little-endian word -> 3 bytes.
    c = [u[:, k] for k in range(8)]
    b0 = c[0] | (c[1] << 3) | ((c[2] & 0x3) << 6)
    b1 = (c[2] >> 2) | (c[3] << 1) | (c[4] << 4) | ((c[5] & 0x1) << 7)
    b2 = (c[5] >> 1) | (c[6] << 2) | (c[7] << 5)
    return torch.stack([b0, b1, b2], dim=1).reshape(-1)


def unpack(packed: torch.Tensor, bits: Bits, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` values as a 1-D tensor.

    Returns ``int8`` for integer widths and ``float8_e4m3fn`` for ``bits="fp8"``.
    ``packed`` must be a ``uint8`` tensor of exactly ``packed_nbytes(numel, bits)``
    bytes (any shape; it is read in row-major order).
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise PackError(f"unpack needs a uint8 tensor, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise PackError(
            f"packed stream has {packed.numel()} bytes, expected {expected} for "
            f"{numel} values at bits={bits!r}"
        )
    flat = packed.contiguous().reshape(-1)
    if bits == "fp8":
        return flat.view(torch.float8_e4m3fn).clone()
    if bits == 8:
        return flat.view(torch.int8).clone()

    half = 1 << (bits - 1)
    if bits == 4:
        u = torch.stack([flat & 0xF, flat >> 4], dim=1)
    elif bits == 2:
        u = torch.stack([flat & 0x3, (flat >> 2) & 0x3, (flat >> 4) & 0x3, flat >> 6], dim=1)
    else:
        b = flat.view(-1, 3)
        b0, b1, b2 = b[:, 0], b[:, 1], b[:, 2]
        u = torch.stack(
            [
                b0 & 0x7,
                (b0 >> 3) & 0x7,
                (b0 >> 6) | ((b1 & 0x1) << 2),
                (b1 >> 1) & 0x7,
                (b1 >> 4) & 0x7,
                (b1 >> 7) | ((b2 & 0x3) << 1),
                (b2 >> 2) & 0x7,
                b2 >> 5,
            ],
            dim=1,
        )
    u = u.reshape(-1)[:numel]
    # u - half wraps modulo 256 in uint8; the int8 view is then the signed value.
    return (u - half).view(torch.int8)


# --------------------------------------------------------------------------- fast path (private)

_LITTLE_ENDIAN = sys.byteorder == "little"
_W3 = torch.tensor([float(8 ** k) for k in range(8)])      # 3-bit fields of a 24-bit word
_OFF3 = 4.0 * sum(8 ** k for k in range(8))                 # + half = 4 on each of the 8 fields


def pack_float_into(x: torch.Tensor, n: int, bits: Bits, out: torch.Tensor, tmp_f32: torch.Tensor,
                    tmp_i32: torch.Tensor) -> None:
    """Write :func:`pack` of the first ``n`` values of the float32 1-D buffer ``x`` into ``out``.

    Private fast path for the quantizer.  ``x`` holds integer values in ``[-2**(bits-1), 2**(bits-1)-1]``
    (any float32 for ``"fp8"``; the cast rounds as ``.to(float8_e4m3fn)`` does) and must have room for
    a whole number of packing units (its tail beyond ``n`` is overwritten with padding).  ``out``:
    uint8, exactly ``packed_nbytes(n, bits)`` bytes.  ``tmp_f32`` / ``tmp_i32``: scratch buffers of at
    least ``ceil(n / values_per_unit(bits))`` elements.  The bytes equal ``pack(q, bits)`` exactly: the
    offset-binary units are formed as exact small-integer float sums and converted once.
    """
    if bits == "fp8":
        out.view(torch.float8_e4m3fn).copy_(x[:n])
        return
    if bits == 8:
        out.view(torch.int8).copy_(x[:n])
        return
    vpu, _ = _UNIT[bits]
    half = 1 << (bits - 1)
    n_units = -(-n // vpu)
    if n_units * vpu != n:
        x[n:n_units * vpu].fill_(-half)          # padding: bit pattern 0 = offset-binary -half
    xv = x[:n_units * vpu].view(n_units, vpu)
    t = tmp_f32[:n_units]
    if bits == 3:
        torch.mv(xv, _W3, out=t)                 # sum q_k 8^k: exact (|sum| < 2**24)
        t.add_(_OFF3)                            # the 24-bit unit, in [0, 2**24)
        ti = tmp_i32[:n_units]
        ti.copy_(t)
        if _LITTLE_ENDIAN:
            out.view(n_units, 3).copy_(ti.view(torch.uint8).view(n_units, 4)[:, :3])
        else:
            o = out.view(n_units, 3)
            for k in range(3):
                o[:, k].copy_((ti >> (8 * k)) & 0xFF)
        return
    # The unit byte u = sum (q_k + half) << (bits*k); u - 128 fits int8, so the float -> int8 cast is
    # exact, and the uint8 view + 128 (wrapping) is u.
    if bits == 4:
        torch.add(xv[:, 0], xv[:, 1], alpha=16, out=t)
        t.add_(8 + 16 * 8 - 128)
    else:  # bits == 2
        torch.add(xv[:, 0], xv[:, 1], alpha=4, out=t)
        t.add_(xv[:, 2], alpha=16).add_(xv[:, 3], alpha=64)
        t.add_(2 * (1 + 4 + 16 + 64) - 128)
    out.view(torch.int8).copy_(t)
    out.add_(128)
