"""QuantizedLinear: every route equals the dequantized weight, routes are chosen per device and dtype (fishlab's
own CPU kernels, or torch's own ops: no torch layout rebuilt by hand, nothing skipped because of the CPU's
instruction set), memory is what the route holds. Every test runs twice on the CPU: with the own kernels
(`cpu_kernels` "own") and with them switched off ("torch": torch's ops, what a machine without a C compiler
gets). CUDA-only tests run the same checks as their CPU twins (the `device` parameter)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishlab.quant import cgemv
from fishlab.quant import qlinear as ql
from fishlab.quant.primitives import (
    FP8_ROW,
    INT2_G64,
    INT3_G128,
    INT4_G128,
    INT8_ROW,
    NonFiniteWeightError,
    Scheme,
    dequantize,
    dequantize_tensor,
    quantize_tensor,
)
from fishlab.quant.qlinear import QuantizedLinear, cuda_route, plan_route

SCHEMES = [
    FP8_ROW,
    INT8_ROW,
    INT4_G128,
    INT3_G128,
    INT2_G64,
    Scheme("int", 4, 128, "bfloat16"),
    Scheme("int", 4, 64),
    Scheme("int", 8, None, "float16"),
    Scheme("int", 4, 128, zero_point=True),            # zero points: int4_mm with the ops' own zeros
    Scheme("int", 2, 64, "bfloat16", zero_point=True),  # zero points: dense
]
ACT_DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device (the cpu case is its twin)"))]


@pytest.fixture(autouse=True, params=["own", "torch"])
def cpu_kernels(request):
    if request.param == "own":
        assert cgemv.available(), f"fishlab's CPU kernels did not build: {cgemv.reason()}"
        yield "own"
    else:
        with cgemv.disabled():
            yield "torch"


def _cpu_route(scheme, K, kernels):
    """The bf16 CPU route of a [N % 16 == 0, K] linear under `scheme`."""
    if scheme.method == "int" and scheme.bits == 8 and scheme.group_size is None:
        return "int8_gemv" if kernels == "own" else "int8_mm"
    if scheme.method == "int" and scheme.bits == 4:
        if kernels == "own" and cgemv.int4_ok(K, scheme.group_size):
            return "int4_gemv"
        return "int4_mm"
    return "dense"


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16).requires_grad_(False)


def _reference(x, qt, bias):
    w = dequantize_tensor(qt, torch.float32).to(x.dtype).to(x.device)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype).to(x.device))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequant_reference(scheme, dtype, bias):
    lin = _linear(96, 384, bias=bias)
    qt = quantize_tensor("blk.w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias)
    x = torch.randn(2, 3, 384).to(dtype)
    y = m(x)
    assert y.shape == (2, 3, 96) and y.dtype == dtype
    torch.testing.assert_close(y, _reference(x, qt, lin.bias), **TOL[dtype])
    # the same with kernels disabled (pure dequant path)
    m2 = QuantizedLinear.from_qtensor(qt, lin.bias, use_kernels=False)
    assert m2.route(x) == "dequant"
    torch.testing.assert_close(m2(x), _reference(x, qt, lin.bias), **TOL[dtype])


def test_routes_on_cpu(cpu_kernels):
    """bfloat16: INT8 per row -> int8_gemv (own kernel) or int8_mm (torch); INT4 g32..256 -> int4_gemv when K %
    128 == 0 (own kernel, any N), else int4_mm when N % 16 == 0 (torch's conversion op packs the weight).
    float32 / float16 (where the CPU kernels are slower than a dense matmul) and every other scheme -> dense.
    None of this may depend on the ISA."""
    own = cpu_kernels == "own"
    bf = torch.randn(4, 384, dtype=torch.bfloat16)
    m8 = QuantizedLinear.from_float(_linear(96, 384), INT8_ROW)
    assert m8.route(bf) == ("int8_gemv" if own else "int8_mm")
    assert m8.route(bf.float()) == "dense" and m8.route(bf.half()) == "dense"
    for s in (INT4_G128, Scheme("int", 4, 32), Scheme("int", 4, 64), Scheme("int", 4, 256, "bfloat16"),
              Scheme("int", 4, 128, zero_point=True)):
        m4 = QuantizedLinear.from_float(_linear(96, 512), s, compute_dtype=torch.bfloat16)
        assert (m4.route_name, m4.layout) == (("int4_gemv", "generic") if own else ("int4_mm", "cpu_int4pack")), s.name
    # N % 16 != 0: only the own kernel takes it; K % 128 != 0: only torch's (N % 16 == 0)
    assert QuantizedLinear.from_float(_linear(40, 384), INT4_G128).route(bf) == ("int4_gemv" if own else "dense")
    assert QuantizedLinear.from_float(_linear(32, 320), Scheme("int", 4, 64)).route(
        torch.randn(1, 320).bfloat16()) == "int4_mm"
    assert QuantizedLinear.from_float(_linear(32, 200), INT4_G128).route(torch.randn(1, 200).bfloat16()) == "dense"
    for s in (FP8_ROW, INT3_G128, INT2_G64):
        assert QuantizedLinear.from_float(_linear(96, 384), s).route(bf) == "dense"
    assert plan_route(INT4_G128, (96, 384), "cpu", torch.bfloat16) == ("int4_gemv" if own else "int4_mm")


def test_cuda_route_rule_on_cpu():
    """The CUDA route rule as a pure function of the compute capability (the CPU twin of the CUDA routes)."""
    yes = lambda r: True   # noqa: E731
    bf = torch.bfloat16
    assert cuda_route(INT8_ROW, 4096, 2560, bf, (7, 5), yes) == "int8_mm"
    assert cuda_route(INT8_ROW, 4096, 2560, bf, (9, 0), lambda r: r != "int8_mm") == "dense"
    assert cuda_route(INT4_G128, 4096, 2560, bf, (8, 0), yes) == "int4_tinygemm"
    assert cuda_route(INT4_G128, 4096, 2560, bf, (7, 5), yes) == "dense"              # tinygemm needs sm80
    assert cuda_route(INT4_G128, 4096, 2560, torch.float16, (9, 0), yes) == "dense"   # bf16 activations only
    assert cuda_route(INT4_G128, 4100, 2560, bf, (9, 0), yes) == "dense"              # N % 8
    assert cuda_route(FP8_ROW, 4096, 2560, bf, (8, 9), yes) == "fp8_scaled_mm"
    assert cuda_route(FP8_ROW, 4096, 2560, bf, (8, 6), yes) == "dense"                # no fp8 tensor cores
    assert cuda_route(FP8_ROW, 4096, 2568 + 4, bf, (9, 0), yes) == "dense"            # K % 16
    for s in (INT3_G128, INT2_G64):
        assert cuda_route(s, 4096, 2560, bf, (9, 0), yes) == "dense"


def test_tinygemm_input_format():
    """`_convert_weight_to_int4pack`'s documented input: [N, K/2] uint8, even column in the high nibble."""
    u = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    assert ql.tinygemm_input(u).tolist() == [[0x12, 0x34], [0xF0, 0x78]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", [INT8_ROW, INT4_G128, Scheme("int", 4, 64), FP8_ROW, INT3_G128,
                                    Scheme("int", 4, 128, zero_point=True)], ids=lambda s: s.name)
def test_prepared_route_equals_dequantized_on_device(device, scheme, cpu_kernels):
    """The route picked for bf16 on `device` vs F.linear with the dequantized weight: within bf16 noise for the
    weight-only kernels, within the activation-quantization error for fp8_scaled_mm (W8A8)."""
    lin = _linear(256, 512)
    qt = quantize_tensor("w", lin.weight, scheme).to(device)
    m = QuantizedLinear.from_qtensor(qt, lin.bias.to(device), compute_dtype=torch.bfloat16)
    ref = None
    for rows in (1, 3, cgemv.MAX_ROWS + 5):            # batch 1 and a few: the GEMV; more: the matmul fallback
        x = torch.randn(rows, 512, device=device).bfloat16()
        ref = _reference(x.float(), qt, lin.bias)
        y = m(x).float()
        rel = float((y - ref).norm() / ref.norm())
        assert rel < (0.05 if m.route_name == "fp8_scaled_mm" else 0.01), (m.route_name, rows, rel)
    if device == "cpu":
        assert m.route_name == _cpu_route(scheme, 512, cpu_kernels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", [INT8_ROW, INT4_G128, Scheme("int", 4, 32, "bfloat16")], ids=lambda s: s.name)
def test_weight_only_kernels_exact_on_one_hot_input(device, scheme):
    """One-hot bf16 rows recover W' column by column: torch's kernels' weight is q * bf16(scale), bit for bit;
    the own kernels' is bf16(q * scale) (float32 scales, one rounding), bit for bit, one row at a time (the GEMV);
    with more rows int4_gemv dequantizes the same way for a matmul and int8_gemv takes torch's op."""
    lin = _linear(64, 256)
    qt = quantize_tensor("w", lin.weight, scheme).to(device)
    m = QuantizedLinear.from_qtensor(qt, compute_dtype=torch.bfloat16)
    assert m.route_name in ql.KERNEL_ROUTES
    eye = torch.eye(256, dtype=torch.bfloat16, device=device)
    own = dequantize(qt.unpack(), qt.scale, scheme.group_size, torch.bfloat16)
    torchs = dequantize(qt.unpack(), qt.scale.to(torch.bfloat16), scheme.group_size, torch.bfloat16)
    if m.route_name in ("int8_gemv", "int4_gemv"):
        assert torch.equal(torch.cat([m(eye[i:i + 1]) for i in range(256)]).t(), own)
    assert torch.equal(m(eye).t(), own if m.route_name == "int4_gemv" else torchs)


@pytest.mark.parametrize("shape,scheme",
                         [((40, 384), INT4_G128), ((32, 200), INT4_G128), ((33, 70), INT3_G128), ((5, 7), INT2_G64),
                          ((3, 9), FP8_ROW)])
def test_odd_shapes(shape, scheme):
    lin = _linear(*shape)
    qt = quantize_tensor("odd", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias)
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(m(x), _reference(x, qt, lin.bias), **TOL[torch.float32])


def test_float64_and_1d_input():
    lin = _linear(32, 256)
    m = QuantizedLinear.from_float(lin, INT8_ROW)
    qt = m.to_qtensor()
    x = torch.randn(256, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(x, qt, lin.bias))
    x = torch.randn(256)
    m = QuantizedLinear.from_float(lin, INT8_ROW)
    assert m(x).shape == (32,)
    torch.testing.assert_close(m(x), _reference(x, qt, lin.bias), **TOL[torch.float32])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_to_qtensor_roundtrip_and_dequantized_weight(scheme, dtype):
    """Exact after prepare too: a device-packed int4 weight is read back through torch's op (checked by
    re-packing), never through a hand-written layout."""
    lin = _linear(48, 256)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias, compute_dtype=dtype)
    back = m.to_qtensor()
    assert torch.equal(back.qdata, qt.qdata) and torch.equal(back.scale, qt.scale)
    assert back.scheme == scheme and back.shape == qt.shape and back.dtype == qt.dtype
    assert torch.equal(m.dequantized_weight(), dequantize_tensor(qt, torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_memory_is_what_the_route_holds(scheme, cpu_kernels):
    """Unprepared: packed stream + scales only. Prepared for bf16: a kernel route adds only its scale operand
    (int4_mm: scales-and-zeros, 2 bf16 per group; int4_gemv: float32 scale * (zero + 128) per group, and the
    scales as float32 unless stored so; int8_gemv: float32 row scales unless stored so); the dense route adds
    the dequantized bf16 weight, and nothing else holds a float copy."""
    lin = _linear(256, 1024, bias=False)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt)
    assert list(m.parameters()) == []
    assert m.nbytes() == qt.nbytes()
    route = m.prepare(torch.bfloat16)
    bf16_bytes = 256 * 1024 * 2
    storages = {b.untyped_storage().data_ptr(): b.numel() * b.element_size() for b in m.buffers()}
    assert m.nbytes() == sum(storages.values())
    if route == "dense":
        assert m.nbytes() == qt.nbytes() + bf16_bytes and m.kscale is None
    else:
        own_scale = 0 if scheme.scale_dtype in ("float32", torch.float32) else 4     # a float32 copy of the scales
        extra = {"int8_mm": 256 * 2, "int8_gemv": 256 * own_scale,
                 "int4_mm": 256 * (1024 // (scheme.group_size or 1)) * 2 * 2,
                 "int4_gemv": 256 * (1024 // (scheme.group_size or 1)) * (4 + own_scale)}[route]
        assert m.nbytes() == qt.nbytes() + extra and m.w_dense is None
        if scheme.bits == 4:
            qparam_bits = 96 if scheme.zero_point else 64       # scale (+ zero) + kscale, per group
            if route == "int4_gemv":
                qparam_bits += 32 + 8 * own_scale
            assert m.nbytes() < (4 + qparam_bits / scheme.group_size) / 16 * bf16_bytes + 1
    assert route == _cpu_route(scheme, 1024, cpu_kernels)


def test_nbytes_counts_bias():
    lin = _linear(64, 256, bias=True)
    m = QuantizedLinear.from_float(lin, INT4_G128)      # unprepared: packed weight, float32 scales, bf16 bias
    assert m.nbytes() == 64 * 256 // 2 + 64 * 2 * 4 + 64 * 2


def test_module_casts_keep_scale_dtype_and_re_prepare(cpu_kernels):
    lin = _linear(64, 256)
    m = QuantizedLinear.from_float(lin, INT4_G128, compute_dtype=torch.bfloat16)
    bf16_route = _cpu_route(INT4_G128, 256, cpu_kernels)
    assert m.route_name == bf16_route and m.layout == ("generic" if bf16_route == "int4_gemv" else "cpu_int4pack")
    qt = m.to_qtensor()
    s = m.scale.clone()
    m.to(torch.float16)                                   # re-prepared for fp16: dense on the CPU
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, s)
    assert m.bias.dtype == torch.float16 and m.route_name == "dense" and m.layout == "generic"
    x = torch.randn(2, 256, dtype=torch.float16)
    ref = F.linear(x, dequantize_tensor(qt, torch.float32).half(), m.bias)
    torch.testing.assert_close(m(x), ref, rtol=2e-2, atol=5e-2)
    m.to(torch.bfloat16)
    assert m.route_name == bf16_route and torch.equal(m.to_qtensor().qdata, qt.qdata)


def test_other_dtype_than_prepared_is_logged_and_correct(caplog):
    lin = _linear(64, 256)
    m = QuantizedLinear.from_float(lin, INT8_ROW, compute_dtype=torch.bfloat16, name="blk.w")
    x = torch.randn(3, 256)
    with caplog.at_level(logging.WARNING, logger="fishlab.qlinear"):
        assert m.route(x) == "dequant"
        torch.testing.assert_close(m(x), _reference(x, m.to_qtensor(), lin.bias), **TOL[torch.float32])
        m(x)
    assert sum("dequantizing in forward" in r.message for r in caplog.records) == 1


def test_from_float_refuses_nonfinite_with_name():
    lin = _linear(16, 128)
    with torch.no_grad():
        lin.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="decoder.out.weight"):
        QuantizedLinear.from_float(lin, INT4_G128, name="decoder.out.weight")


def test_rejects_non_2d_and_bad_bias():
    qt = quantize_tensor("w", torch.randn(4, 3, 5), INT8_ROW)
    with pytest.raises(ValueError, match="2-D"):
        QuantizedLinear.from_qtensor(qt)
    qt = quantize_tensor("w", torch.randn(4, 8), INT8_ROW)
    with pytest.raises(ValueError, match="bias"):
        QuantizedLinear.from_qtensor(qt, torch.zeros(5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_device_move_re_prepares(device, scheme):
    """A module prepared on the CPU and moved to `device` (cuda, or cpu for the twin) is re-prepared there from
    the exact generic stream, and still computes the dequantized weight's product."""
    lin = _linear(96, 384)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias, compute_dtype=torch.bfloat16).to(device)
    assert m.qdata.device.type == device and m.compute_dtype == torch.bfloat16
    x = torch.randn(3, 384, dtype=torch.bfloat16, device=device)
    ref = _reference(x.float(), qt, lin.bias)
    rel = float((m(x).float() - ref).norm() / ref.norm())
    assert rel < (0.05 if m.route_name == "fp8_scaled_mm" else 0.01), (m.route_name, rel)
    assert torch.equal(m.to_qtensor().qdata.cpu(), qt.qdata)
