import json
import math

import pytest
import torch

from fishlab.quant import pack as packmod
from fishlab.quant.primitives import (
    FORMAT_VERSION,
    FP8_ROW,
    INT2_G64,
    INT3_G128,
    INT4_G128,
    INT8_ROW,
    NonFiniteWeightError,
    QTensor,
    QuantError,
    Scheme,
    SchemeError,
    choose_qparams,
    dequantize,
    dequantize_tensor,
    describe,
    from_description,
    quantize,
    quantize_tensor,
)

PLAN_SCHEMES = [FP8_ROW, INT8_ROW, INT4_G128, INT3_G128, INT2_G64]
ALL_SCHEMES = PLAN_SCHEMES + [
    Scheme("int", 4, 128, "bfloat16"),
    Scheme("int", 8, None, "float16"),
    Scheme("fp8", 8, None, "bfloat16"),
    Scheme("int", 3, 128, "float16"),
]


def _rand(shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _heavy_tailed(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((3,) + tuple(shape), generator=g) ** 2).sum(0)
    return (z / torch.sqrt(chi2 / 3)).to(torch.bfloat16)


# ---------------------------------------------------------------- Scheme


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(method="nf4", bits=4), "method"),
        (dict(method="fp8", bits=4), "bits=8"),
        (dict(method="int", bits=5), "bits"),
        (dict(method="int", bits=True), "bits"),
        (dict(method="int", bits=4.0), "bits"),
        (dict(method="int", bits=4, group_size=0), "group_size"),
        (dict(method="int", bits=4, group_size=True), "group_size"),
        (dict(method="int", bits=4, group_size=64.0), "group_size"),
        (dict(method="int", bits=4, scale_dtype="float64"), "scale_dtype"),
    ],
)
def test_scheme_validation(kwargs, msg):
    with pytest.raises(SchemeError, match=msg):
        Scheme(**kwargs)
    assert issubclass(SchemeError, ValueError)


def test_scheme_names_and_dict_roundtrip():
    assert [s.name for s in PLAN_SCHEMES] == ["fp8_row", "int8_row", "int4_g128", "int3_g128", "int2_g64"]
    assert Scheme("int", 4, 128, "bfloat16").name == "int4_g128_bf16"
    assert [s.qmax for s in PLAN_SCHEMES] == [448.0, 127.0, 7.0, 3.0, 1.0]
    for s in ALL_SCHEMES:
        assert Scheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(SchemeError, match="unknown"):
        Scheme.from_dict({"method": "int", "bits": 4, "zero_offset": 3})
    with pytest.raises(SchemeError, match="lacks"):
        Scheme.from_dict({"method": "int"})


# ---------------------------------------------------------------- hand-worked cases


def test_int8_row_hand_case():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    s = choose_qparams(w, 8)
    assert s.shape == (1, 1) and s.dtype == torch.float32
    assert s.item() == torch.tensor(1.0 / 127, dtype=torch.float32).item()
    q = quantize(w, s, 8)
    # 0.5 / (1/127) = 63.5 exactly in float32 -> ties to even -> 64
    assert q.tolist() == [[64, -127, 32, 0]]
    assert q.dtype == torch.int8
    torch.testing.assert_close(dequantize(q, s), q.float() * s, rtol=0, atol=0)


def test_round_half_to_even_ties():
    # max 127 -> scale exactly 1.0, so w/scale are exact ties
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 127.0]])
    s = choose_qparams(w, 8)
    assert s.item() == 1.0
    assert quantize(w, s, 8).tolist() == [[0, 2, 2, 0, -2, -2, 4, 127]]


def test_fp8_scale_and_values():
    w = torch.tensor([[896.0, 1.0, -2.0, 0.0], [1.0, 2.0, 3.0, 0.1]])
    s = choose_qparams(w, "fp8")
    assert s[0, 0].item() == 2.0
    assert s[1, 0].item() == torch.tensor(3.0 / 448, dtype=torch.float32).item()
    q = quantize(w, s, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert q[0].float().tolist() == [448.0, 0.5, -1.0, 0.0]
    assert q[1, 2].float().item() == 448.0
    d = dequantize(q, s)
    assert d[0].tolist() == [896.0, 1.0, -2.0, 0.0]
    torch.testing.assert_close(d, q.float() * s, rtol=0, atol=0)
    # fp8 rounding: 0.1 / (3/448) = 14.93 -> nearest e4m3 value is 15
    assert q[1, 3].float().item() == 15.0


def test_int2_ternary_crafted_group():
    row = torch.zeros(64)
    row[:7] = torch.tensor([1.0, -0.5, 0.5, 0.49, -0.51, -1.0, 0.75])
    w = row.view(1, 64)
    s = choose_qparams(w, 2, 64)
    assert s.tolist() == [[1.0]]
    q = quantize(w, s, 2, 64)
    assert q[0, :7].tolist() == [1, 0, 0, 0, -1, -1, 1]  # ties +-0.5 -> 0 (even)
    assert q.abs().max() <= 1


def test_int4_and_int3_group_scales():
    w = torch.zeros(2, 256)
    w[0, :128] = torch.linspace(-7, 7, 128)
    w[0, 128:] = torch.linspace(-14, 3, 128)
    w[1, :] = 0.3
    s4 = choose_qparams(w, 4, 128)
    assert s4.shape == (2, 2)
    assert s4.tolist() == [[1.0, 2.0], [pytest.approx(0.3 / 7), pytest.approx(0.3 / 7)]]
    q4 = quantize(w, s4, 4, 128)
    assert q4.min() >= -7 and q4.max() <= 7
    assert torch.equal(q4[0, :128], torch.round(w[0, :128]).to(torch.int8))
    assert (q4[1] == 7).all()
    s3 = choose_qparams(w, 3, 128)
    assert s3[0].tolist() == [7 / 3, 14 / 3] or torch.allclose(s3[0], torch.tensor([7 / 3, 14 / 3]))
    q3 = quantize(w, s3, 3, 128)
    assert q3.min() >= -3 and q3.max() <= 3 and (q3[1] == 3).all()


# ---------------------------------------------------------------- zero groups / non-finite


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
def test_all_zero_rows_and_groups(scheme):
    w = _rand((6, 256), seed=3)
    w[1] = 0  # whole row
    w[3, :128] = 0  # one group (for g<=128) / part of a row
    w[4, 64:128] = 0  # an int2 g64 group
    qt = quantize_tensor("blk.zero.weight", w, scheme)
    assert torch.isfinite(qt.scale.float()).all()
    assert (qt.scale[1] == 0).all()
    d = dequantize_tensor(qt, torch.float32)
    assert torch.isfinite(d).all()
    assert (d[1] == 0).all() and (d[3, :128] == 0).all() and (d[4, 64:128] == 0).all()
    q = qt.unpack().float()
    assert (q[1] == 0).all()


def test_entirely_zero_tensor():
    for scheme in ALL_SCHEMES:
        qt = quantize_tensor("z", torch.zeros(4, 130, dtype=torch.bfloat16), scheme)
        assert (qt.scale == 0).all()
        assert (dequantize_tensor(qt) == 0).all()


@pytest.mark.parametrize("scheme", PLAN_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_refused_with_name(scheme, bad):
    w = _rand((4, 256), seed=4)
    w[2, 200] = bad
    name = "layers.7.attention.wqkv.weight"
    with pytest.raises(NonFiniteWeightError, match=r"layers\.7\.attention\.wqkv\.weight") as ei:
        quantize_tensor(name, w, scheme)
    assert "flat index 712" in str(ei.value)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(NonFiniteWeightError, match="my.tensor"):
        choose_qparams(w, scheme.pack_bits, scheme.group_size, name="my.tensor")


def test_bad_inputs():
    with pytest.raises(QuantError, match="w0"):
        quantize_tensor("w0", torch.ones((), dtype=torch.float32), INT8_ROW)
    with pytest.raises(QuantError, match="w1"):
        quantize_tensor("w1", torch.ones(3, 3, dtype=torch.int32), INT8_ROW)
    with pytest.raises(SchemeError):
        quantize_tensor("w2", torch.ones(3, 3), "int4")
    with pytest.raises(QuantError, match="scale shape"):
        quantize(torch.ones(3, 256), torch.ones(3, 1), 4, 128)
    with pytest.raises(SchemeError):
        choose_qparams(torch.ones(3, 3), 5)


# ---------------------------------------------------------------- shapes and grouping


def test_non_dividing_group_is_implicit_zero_padding():
    w = _rand((5, 200), seed=5)
    qt = quantize_tensor("odd", w, INT4_G128)
    assert qt.n_groups == 2 and qt.group_padding == 56 and qt.scale.shape == (5, 2)
    assert qt.qdata.numel() == packmod.packed_nbytes(5 * 200, 4)  # padding is not stored
    d = dequantize_tensor(qt, torch.float32)
    assert d.shape == (5, 200)
    # identical to quantizing the explicitly zero-padded matrix and cropping
    wp = torch.nn.functional.pad(w, (0, 56))
    qp = quantize_tensor("padded", wp, INT4_G128)
    assert torch.equal(qp.scale, qt.scale)
    assert torch.equal(qp.unpack()[:, :200], qt.unpack())
    assert torch.equal(dequantize_tensor(qp, torch.float32)[:, :200], d)


@pytest.mark.parametrize(
    "shape,scheme",
    [
        ((3, 7), INT3_G128),  # group longer than the row
        ((1, 1), INT2_G64),
        ((17,), INT4_G128),  # 1-D: a single row
        ((4, 3, 5), INT8_ROW),  # N-D: rows = dim 0
        ((4, 3, 50), INT4_G128),
        ((9, 65), INT2_G64),
        ((7, 129), FP8_ROW),
        ((7, 129), Scheme("fp8", 8, 32)),
    ],
)
def test_odd_shapes_roundtrip(shape, scheme):
    w = _rand(shape, seed=6)
    qt = quantize_tensor("odd.shape", w, scheme)
    assert qt.shape == shape
    d = dequantize_tensor(qt, torch.float32)
    assert d.shape == w.shape
    rows = shape[0] if len(shape) > 1 else 1
    direct = dequantize(quantize(w, choose_qparams(w, scheme.pack_bits, scheme.group_size),
                                 scheme.pack_bits, scheme.group_size),
                        choose_qparams(w, scheme.pack_bits, scheme.group_size), scheme.group_size)
    assert torch.equal(d, direct)
    assert qt.scale.shape[0] == rows
    assert dequantize_tensor(qt).dtype == torch.bfloat16  # default: original dtype


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
def test_quantize_pack_unpack_dequant_equals_direct(scheme):
    w = _rand((48, 384), seed=7)
    bits, g = scheme.pack_bits, scheme.group_size
    s = choose_qparams(w, bits, g, scheme.scale_dtype)
    q = quantize(w, s, bits, g)
    direct = dequantize(q, s, g)
    qt = quantize_tensor("w", w, scheme)
    assert torch.equal(qt.scale, s)
    assert qt.qdata.dtype == torch.uint8 and qt.qdata.dim() == 1
    unpacked = packmod.unpack(qt.qdata, bits, w.numel()).view(48, 384)
    if scheme.method == "fp8":
        assert torch.equal(unpacked.view(torch.uint8), q.view(torch.uint8))
    else:
        assert torch.equal(unpacked, q)
    assert torch.equal(dequantize_tensor(qt, torch.float32), direct)


@pytest.mark.parametrize("scheme", [INT3_G128, INT2_G64, INT4_G128, FP8_ROW], ids=lambda s: s.name)
def test_chunked_quantize_tensor_matches_single_pass(scheme):
    w = _rand((37, 200), seed=8)  # 37 rows: chunks of 8 rows + a partial chunk
    a = quantize_tensor("w", w, scheme, chunk_elems=1 << 30)
    b = quantize_tensor("w", w, scheme, chunk_elems=1000)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def test_math_is_float32_from_stored_weights():
    w = _rand((8, 128), seed=9, dtype=torch.bfloat16)
    qt = quantize_tensor("w", w, INT8_ROW)
    s = w.float().abs().amax(1, keepdim=True) / 127
    assert torch.equal(qt.scale, s)
    q = torch.round(w.float() / s).clamp(-127, 127)
    assert torch.equal(qt.unpack().float(), q)


# ---------------------------------------------------------------- scale dtypes


@pytest.mark.parametrize("sdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("base", [INT4_G128, INT8_ROW, FP8_ROW, INT2_G64], ids=lambda s: s.name)
def test_low_precision_scales_self_consistent(sdt, base):
    scheme = Scheme(base.method, base.bits, base.group_size, sdt)
    w = _heavy_tailed((16, 256), seed=10)
    qt = quantize_tensor("w", w, scheme)
    assert qt.scale.dtype == getattr(torch, sdt)
    s = qt.scale.float()
    g = scheme.group_size or 256
    q = qt.unpack().float()
    # quantization used the *rounded* scale
    x = (w.float().view(16, -1, g) / s.unsqueeze(2)).view(16, 256)
    if scheme.method == "fp8":
        expect = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    else:
        expect = torch.round(x).clamp(-scheme.qmax, scheme.qmax)
    assert torch.equal(q, expect)
    assert q.abs().max() <= scheme.qmax  # clamped even where the rounded scale is smaller
    # dequantization uses the same rounded scale
    d = dequantize_tensor(qt, torch.float32)
    assert torch.equal(d, (q.view(16, -1, g) * s.unsqueeze(2)).view(16, 256))


def test_fp16_scale_overflow_is_an_error():
    w = torch.full((2, 64), 1e7)
    with pytest.raises(QuantError, match="overflow"):
        quantize_tensor("huge", w, Scheme("int", 2, 64, "float16"))
    quantize_tensor("huge", w, Scheme("int", 2, 64, "bfloat16"))  # fine in bf16


# ---------------------------------------------------------------- error vs bits


def test_error_decreases_with_bits():
    w = _heavy_tailed((256, 1024), seed=11)
    wf = w.float()

    def rel(s):
        d = dequantize_tensor(quantize_tensor("w", w, s), torch.float32)
        return ((d - wf).norm() / wf.norm()).item()

    e = {s.name: rel(s) for s in PLAN_SCHEMES}
    assert e["int2_g64"] > e["int3_g128"] > e["int4_g128"] > e["int8_row"]
    assert e["fp8_row"] < e["int4_g128"]
    assert e["int8_row"] < 0.05 and e["int2_g64"] < 1.0


# ---------------------------------------------------------------- description


@pytest.mark.parametrize("scheme", ALL_SCHEMES + [Scheme("int", 4, 100)], ids=lambda s: s.name)
def test_describe_roundtrip(scheme):
    w = _rand((24, 300), seed=12)
    qt = quantize_tensor("blk.0.ffn.w1.weight", w, scheme)
    desc = json.loads(json.dumps(describe(qt)))  # JSON-serialisable
    assert desc["format_version"] == FORMAT_VERSION
    assert desc["shape"] == [24, 300] and desc["dtype"] == "bfloat16"
    assert desc["scheme"] == scheme.name
    assert desc["scale_shape"] == list(qt.scale.shape)
    assert desc["qdata_nbytes"] == qt.qdata.numel()
    rt = from_description(desc, qt.qdata.clone(), qt.scale.clone(), name="blk.0.ffn.w1.weight")
    assert rt.scheme == scheme and rt.shape == qt.shape and rt.dtype == qt.dtype
    assert torch.equal(dequantize_tensor(rt), dequantize_tensor(qt))


def test_describe_fields_and_errors():
    qt = quantize_tensor("x", _rand((4, 200), seed=13), INT3_G128)
    d = describe(qt)
    assert d["encoding"] == "offset_binary_le" and d["group_padding"] == 56 and d["n_groups"] == 2
    assert describe(quantize_tensor("x", _rand((4, 8)), INT8_ROW))["encoding"] == "int8_twos_complement"
    assert describe(quantize_tensor("x", _rand((4, 8)), FP8_ROW))["encoding"] == "float8_e4m3fn"
    with pytest.raises(SchemeError, match="format_version"):
        from_description(dict(d, format_version=99), qt.qdata, qt.scale)
    with pytest.raises(QuantError, match="bytes"):
        from_description(d, qt.qdata[:-3], qt.scale, name="x")
    with pytest.raises(QuantError, match="scale"):
        from_description(d, qt.qdata, qt.scale[:, :1], name="x")
    with pytest.raises(QuantError, match="scale dtype"):
        from_description(d, qt.qdata, qt.scale.to(torch.bfloat16), name="x")
    with pytest.raises(SchemeError, match="dtype"):
        from_description(dict(d, dtype="nope"), qt.qdata, qt.scale)
    with pytest.raises(QuantError, match="cols"):
        from_description(dict(d, cols=7), qt.qdata, qt.scale)


def test_qtensor_nbytes():
    qt = quantize_tensor("x", _rand((64, 256)), INT4_G128)
    assert qt.nbytes() == 64 * 256 // 2 + 64 * 2 * 4
    assert isinstance(qt, QTensor)
    assert math.isclose(qt.nbytes() / (64 * 256 * 2), 0.265625)


def test_safetensors_naming_convention_roundtrip(tmp_path):
    """The convention of docs/packed-format.md §4 works with a plain safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    w = {"blk.0.w1.weight": _rand((32, 200), seed=14), "blk.0.w2.weight": _rand((16, 64), seed=15)}
    schemes = {"blk.0.w1.weight": INT3_G128, "blk.0.w2.weight": Scheme("fp8", 8, None, "bfloat16")}
    tensors, descs = {}, {}
    for k, v in w.items():
        qt = quantize_tensor(k, v, schemes[k])
        tensors[k + ".qdata"], tensors[k + ".scale"] = qt.qdata, qt.scale
        descs[k] = describe(qt)
    meta = {"quantization": json.dumps({"format_version": FORMAT_VERSION, "tensors": descs})}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["quantization"])
        for k, desc in info["tensors"].items():
            qt = from_description(desc, f.get_tensor(k + ".qdata"), f.get_tensor(k + ".scale"), name=k)
            ref = quantize_tensor(k, w[k], schemes[k])
            assert torch.equal(dequantize_tensor(qt), dequantize_tensor(ref))
            assert qt.shape == w[k].shape
