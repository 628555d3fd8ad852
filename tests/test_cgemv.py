"""fishlab's own CPU GEMV kernels (fishlab.quant.cgemv / gemv.c): built from source on this machine, they equal
float32 math on the dequantized weight to one bf16 rounding, for every shape the routes send them (tails,
groups, zero points, 1..MAX_ROWS rows), in BOTH code paths on every machine: the one built for this CPU
(AVX-512 BF16 and VNNI where it has them) and a portable build (plain C loops, as an AVX2-only or non-x86 machine runs)."""
import platform

import pytest
import torch

from fishlab.quant import cgemv
from fishlab.quant.primitives import Scheme, dequantize_tensor, quantize_tensor
from fishlab.quant.qlinear import Linear, float_linear, float_route

PORTABLE = "x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "armv8-a"


def _libs():
    native = cgemv.build("native")
    portable = cgemv.build(PORTABLE)
    for name, (lib, why, _) in (("native", native), (PORTABLE, portable)):
        assert lib is not None, f"gemv.c did not build for -march={name}: {why}"
    assert portable[0].fl_isa() == 0             # the portable build is the plain C path
    return {"native": native[0], "portable": portable[0]}


LIBS = _libs()


def _ulp_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y (bf16) is ref (float32) rounded once, up to float32 summation order: within one bf16 ulp of ref."""
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(1e-6)
    err = (y.float() - ref).abs()
    assert bool((err <= ulp + 1e-6).all()), float((err / ulp).max())


@pytest.mark.parametrize("lib", ["native", "portable"])
@pytest.mark.parametrize("N,K", [(64, 256), (37, 96), (5, 70), (16, 9728 // 4)])
@pytest.mark.parametrize("M", [1, 3, cgemv.MAX_ROWS])
def test_bf16_and_int8(lib, N, K, M):
    g = torch.Generator().manual_seed(N * K + M)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    _ulp_close(cgemv.gemv_bf16(x, w, lib=LIBS[lib]), x.float() @ w.float().t())
    qt = quantize_tensor("w", w, Scheme("int", 8, None))
    q, s = qt.qdata.view(torch.int8).view(N, K), qt.scale.float().reshape(N).contiguous()
    _ulp_close(cgemv.gemv_int8(x, q, s, lib=LIBS[lib]), x.float() @ dequantize_tensor(qt, torch.float32).t())


@pytest.mark.parametrize("lib", ["native", "portable"])
def test_int8_rows_of_every_range(lib):
    """INT8 takes x as exact integers with VNNI (a row's exponent from its largest |x|): rows spanning 2^-40..2^30,
    an outlier beside tiny values, an all-zero row, a row with inf and one with NaN (those take the float32 loop)
    all equal the float64 product to one bf16 rounding plus 2^-20 of sum |x| |w'|."""
    N, K = 24, 320
    g = torch.Generator().manual_seed(7)
    w = torch.randn(N, K, generator=g).bfloat16()
    qt = quantize_tensor("w", w, Scheme("int", 8, None))
    q, s = qt.qdata.view(torch.int8).view(N, K), qt.scale.float().reshape(N).contiguous()
    wd = dequantize_tensor(qt, torch.float64)
    x = torch.randn(6, K, generator=g, dtype=torch.float64)
    x[0] *= torch.pow(2.0, torch.randint(-40, 30, (K,), generator=g).double())   # every exponent at once
    x[1, 5] = 3e4                                                                    # one outlier channel
    x[1, 6:] *= 1e-3
    x[2] = 0.0
    x[3] *= 1e-30
    x = x.bfloat16()
    ref = x.double() @ wd.t()
    y = cgemv.gemv_int8(x[:4], q, s, lib=LIBS[lib]).double()
    slack = 2.0 ** -20 * (x[:4].double().abs() @ wd.abs().t())
    assert bool(((y - ref[:4]).abs() <= torch.finfo(torch.bfloat16).eps * ref[:4].abs() + slack + 1e-30).all())
    assert bool((y[2] == 0).all())
    for bad in (float("inf"), float("nan")):
        xb = x[4:6].clone()
        xb[1, 3] = bad
        yb = cgemv.gemv_int8(xb, q, s, lib=LIBS[lib]).double()
        refb = xb.double() @ wd.t()
        assert bool(torch.isnan(yb[1]).eq(torch.isnan(refb[1])).all()) and not bool(torch.isfinite(yb[1]).any())
        _ulp_close(yb[0].float(), refb[0].float())                 # the finite row beside it is unharmed


@pytest.mark.parametrize("lib", ["native", "portable"])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("N,M", [(64, 1), (13, 2), (40, cgemv.MAX_ROWS)])
def test_int4(lib, group, zero_point, N, M):
    K = 512
    assert cgemv.int4_ok(K, group)
    g = torch.Generator().manual_seed(group + N + M + zero_point)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    qt = quantize_tensor("w", w, Scheme("int", 4, group, zero_point=zero_point))
    s = qt.scale.float().contiguous()
    z = qt.zero.float() if zero_point else torch.full_like(s, 8.0)
    ref = x.float() @ dequantize_tensor(qt, torch.float32).t()
    y = cgemv.gemv_int4(x, qt.qdata, s, (s * (z + 128)).contiguous(), N, K, group, lib=LIBS[lib])
    # the 128 + u trick takes 128 * sum(x) out again: float32 cancellation, a few float32 ulps of |x| |w'|
    slack = 1e-5 * (x.float().abs() @ dequantize_tensor(qt, torch.float32).abs().t())
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs()
    assert bool(((y.float() - ref).abs() <= ulp + slack).all())
    w_bf16 = cgemv.dequant_int4(qt.qdata, s, z.contiguous(), N, K, group, lib=LIBS[lib])
    torch.testing.assert_close(w_bf16, dequantize_tensor(qt, torch.bfloat16), rtol=0, atol=0)


def test_int4_shapes_refused_by_rule():
    assert cgemv.int4_ok(2560, 128) and cgemv.int4_ok(9728, 32) and cgemv.int4_ok(4096, 256)
    assert not cgemv.int4_ok(200, 32)        # K % 128
    assert not cgemv.int4_ok(384, 96)        # not a power of two
    assert not cgemv.int4_ok(512, 16)        # below 32
    assert not cgemv.int4_ok(384, 256)       # does not divide K


def test_float_linear_route_and_values():
    """bf16 on the CPU, at most MAX_ROWS rows, no bias, row-contiguous weight: the own GEMV; anything else
    F.linear. `Linear` keeps nn.Linear's parameters and state dict."""
    w = torch.randn(48, 256).bfloat16()
    x1, xm = torch.randn(1, 1, 256).bfloat16(), torch.randn(cgemv.MAX_ROWS + 1, 256).bfloat16()
    assert float_route(x1, w) == "bf16_gemv"
    assert float_route(xm, w) == "F.linear"
    assert float_route(x1.float(), w.float()) == "F.linear"
    assert float_route(x1, w, torch.zeros(48).bfloat16()) == "F.linear"
    assert float_route(x1, w.t().contiguous().t()) == "F.linear"                 # column-major view
    assert float_route(x1, w[8:40]) == "bf16_gemv"                               # a row slice (the sliced head)
    _ulp_close(float_linear(x1, w[8:40]).reshape(1, 32), x1.reshape(1, 256).float() @ w[8:40].float().t())
    with cgemv.disabled():
        assert float_route(x1, w) == "F.linear" and not cgemv.available()
    lin = Linear(256, 48, bias=False).to(torch.bfloat16)
    assert set(lin.state_dict()) == {"weight"} and isinstance(lin, torch.nn.Linear)
    _ulp_close(lin(x1).reshape(1, 48), x1.reshape(1, 256).float() @ lin.weight.float().t())


def test_custom_ops_trace_under_compile():
    """torch.compile(fullgraph=True) goes through the kernels as custom ops (no graph break) with the eager
    result."""
    w = torch.randn(64, 256).bfloat16()
    qt = quantize_tensor("w", w, Scheme("int", 4, 128))
    s = qt.scale.float().contiguous()
    zc = (s * 136.0).contiguous()
    q8 = quantize_tensor("w", w, Scheme("int", 8, None))
    q, s8 = q8.qdata.view(torch.int8).view(64, 256), q8.scale.float().reshape(64).contiguous()

    def f(x):
        return (cgemv.linear_bf16(x, w) + cgemv.linear_int8(x, q, s8)
                + cgemv.linear_int4(x, qt.qdata, s, zc, 64, 256, 128))

    x = torch.randn(1, 256).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_cache_key_and_atomic_build(tmp_path, monkeypatch):
    """A build goes to $FISHLAB_CACHE under a name that hashes source, compiler, flags and CPU; no partial file is
    left behind; the library is reused on the next call."""
    monkeypatch.setenv("FISHLAB_CACHE", str(tmp_path))
    lib, why, path = cgemv.build("native")
    assert lib is not None and path.parent == tmp_path and path.name.startswith("gemv-"), why
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    _, _, again = cgemv.build("native")
    assert again == path and path.stat().st_mtime_ns == mtime
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, why, _ = cgemv.build("native")
    assert lib is None and "no-such-cc" in why


def test_unwritable_cache_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """A cache directory that cannot be made (here: a file is in the way) turns the kernels off with that reason."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FISHLAB_CACHE", str(blocker / "sub"))
    lib, why, path = cgemv.build("native")
    assert lib is None and path is None and "kernel cache" in why and "FISHLAB_CACHE" in why, why
