import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishlab.quant import qlinear as ql
from fishlab.quant.primitives import (
    FP8_ROW,
    INT2_G64,
    INT3_G128,
    INT4_G128,
    INT8_ROW,
    NonFiniteWeightError,
    Scheme,
    dequantize_tensor,
    quantize_tensor,
)
from fishlab.quant.qlinear import QuantizedLinear, int4pack_cpu_available

SCHEMES = [
    FP8_ROW,
    INT8_ROW,
    INT4_G128,
    INT3_G128,
    INT2_G64,
    Scheme("int", 4, 128, "bfloat16"),
    Scheme("int", 4, 64),
    Scheme("int", 8, None, "float16"),
]
ACT_DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)


def _reference(x, qt, bias):
    w = dequantize_tensor(qt, torch.float32).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


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
    # the same with kernels disabled (pure dequant path) -- exact for fp32 in the dequant route
    m2 = QuantizedLinear.from_qtensor(qt, lin.bias, use_kernels=False)
    assert m2.route(x) == "dequant"
    torch.testing.assert_close(m2(x), _reference(x, qt, lin.bias), **TOL[dtype])


def test_routes_on_cpu():
    x32 = torch.randn(4, 384)
    m8 = QuantizedLinear.from_float(_linear(96, 384), INT8_ROW)
    assert m8.route(x32) == "int8_mm" and m8.route(x32.bfloat16()) == "int8_mm"
    assert m8.route(x32.double()) == "dequant"
    m4 = QuantizedLinear.from_float(_linear(96, 384), INT4_G128)
    if int4pack_cpu_available():
        assert m4.layout == "cpu_int4pack" and m4.route(x32) == "int4_mm"
    m4odd = QuantizedLinear.from_float(_linear(40, 384), INT4_G128)  # rows % 16 != 0
    assert m4odd.layout == "generic" and m4odd.route(x32) == "dequant"
    m4pad = QuantizedLinear.from_float(_linear(32, 200), INT4_G128)  # group does not divide K
    assert m4pad.layout == "generic" and m4pad.route(torch.randn(1, 200)) == "dequant"
    for s in (FP8_ROW, INT3_G128, INT2_G64):
        assert QuantizedLinear.from_float(_linear(96, 384), s).route(x32) == "dequant"


@pytest.mark.parametrize(
    "shape,scheme",
    [((40, 384), INT4_G128), ((32, 200), INT4_G128), ((33, 70), INT3_G128), ((5, 7), INT2_G64), ((3, 9), FP8_ROW)],
)
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
    assert m(x).shape == (32,)
    torch.testing.assert_close(m(x), _reference(x, qt, lin.bias), **TOL[torch.float32])


@pytest.mark.skipif(not int4pack_cpu_available(), reason="CPU int4 ops unavailable")
@pytest.mark.parametrize("n", [16, 32, 48, 64, 80, 96])
def test_int4pack_layout_matches_op(n):
    g = torch.Generator().manual_seed(n)
    u = torch.randint(0, 16, (n, 384), generator=g, dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)
    assert torch.equal(ql._int4pack_from_u(u), ref)
    assert torch.equal(ql._u_from_int4pack(ref, n, 384), u)


@pytest.mark.skipif(not int4pack_cpu_available(), reason="CPU int4 ops unavailable")
def test_int4_kernel_symmetric_mapping_exact_in_fp32():
    # q in [-7, 7] -> u = q + 8, zero = 0: the op must reproduce q * scale exactly (up to fp32 sums)
    lin = _linear(64, 256)
    qt = quantize_tensor("w", lin.weight, INT4_G128)
    m = QuantizedLinear.from_qtensor(qt)
    assert m.layout == "cpu_int4pack"
    eye = torch.eye(256)
    w_from_op = m(eye).t()  # identity input recovers W' column by column
    torch.testing.assert_close(w_from_op, dequantize_tensor(qt, torch.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_to_qtensor_roundtrip_and_dequantized_weight(scheme):
    lin = _linear(48, 256)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias)
    back = m.to_qtensor()
    assert torch.equal(back.qdata, qt.qdata) and torch.equal(back.scale, qt.scale)
    assert back.scheme == scheme and back.shape == qt.shape and back.dtype == qt.dtype
    assert torch.equal(m.dequantized_weight(), dequantize_tensor(qt, torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_memory_is_packed_only(scheme):
    lin = _linear(256, 1024, bias=False)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt)
    assert list(m.parameters()) == []
    assert m.nbytes() == qt.nbytes()  # kernel layout replaces, not adds to, the packed stream
    assert m.nbytes() == sum(b.numel() * b.element_size() for b in m.buffers())
    bf16_bytes = 256 * 1024 * 2
    assert all(b.numel() < 256 * 1024 or b.element_size() == 1 for b in m.buffers())
    if scheme.bits == 4:
        assert m.nbytes() < 0.3 * bf16_bytes
    if scheme == INT2_G64:
        assert m.nbytes() < 0.16 * bf16_bytes


def test_nbytes_counts_bias():
    lin = _linear(64, 256, bias=True)
    m = QuantizedLinear.from_float(lin, INT4_G128)
    assert m.nbytes() == 64 * 256 // 2 + 64 * 2 * 4 + 64 * 2


def test_module_dtype_cast_keeps_scale_dtype():
    lin = _linear(64, 256)
    m = QuantizedLinear.from_float(lin, INT4_G128)
    s = m.scale.clone()
    m.to(torch.float16)
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, s)
    assert m.bias.dtype == torch.float16
    x = torch.randn(2, 256, dtype=torch.float16)
    ref = F.linear(x, dequantize_tensor(m.to_qtensor(), torch.float32).half(), m.bias)
    torch.testing.assert_close(m(x), ref, rtol=2e-2, atol=5e-2)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_cuda_dequant_path(scheme):
    lin = _linear(96, 384)
    qt = quantize_tensor("w", lin.weight, scheme)
    m = QuantizedLinear.from_qtensor(qt, lin.bias).to("cuda")  # CPU int4 layout travels too
    x = torch.randn(3, 384, dtype=torch.bfloat16, device="cuda")
    assert m.route(x) == "dequant"
    ref = _reference(x.cpu(), qt, lin.bias)
    torch.testing.assert_close(m(x).cpu(), ref, **TOL[torch.bfloat16])
    m2 = QuantizedLinear.from_qtensor(qt.to("cuda"), lin.bias.cuda())
    assert m2.layout == "generic"
    torch.testing.assert_close(m2(x).cpu(), ref, **TOL[torch.bfloat16])
