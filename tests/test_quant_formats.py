"""Packed format version 2 end to end on the demo checkpoint: zero points written, validated, counted and run;
a phase's per-tensor overrides (mixed precision) decide each linear; a version-1 file still loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fishlab import spec
from fishlab.checkpoint import OutTensor, iter_tensors, read_headers, transformer_files, write_sharded
from fishlab.config import load_config
from fishlab.demo import build_demo_checkpoint
from fishlab.manifest import hf_to_internal, linear_targets, transformer_manifest
from fishlab.model.load import CheckpointError, load_transformer
from fishlab.phases import Phase
from fishlab.quant.apply import (_is_weight_file, dequantized_state_dict, load_quantized_tensors, quantize_checkpoint,
                                 scheme_of)
from fishlab.quant.primitives import QTensor, Scheme, dequantize_tensor, quantize_tensor
from fishlab.quant.qlinear import QuantizedLinear
from fishlab.sizes import phase_estimate


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("formats") / "demo")


@pytest.fixture(scope="module")
def source(demo) -> dict[str, torch.Tensor]:
    infos, _ = read_headers(demo)
    return dict(iter_tensors(infos))


def _phase(**kw) -> Phase:
    d = {"phase": "t", "method": "int", "bits": 4, "group_size": 64, "target": "slow"}
    d.update(kw)
    return Phase.from_dict(d, "test")


def _weights_bytes(out: Path) -> int:
    """Bytes of every stored tensor (no headers), from the safetensors headers."""
    infos, _ = read_headers(out)
    return sum(i.nbytes for i in infos.values())


def _rewrite(src: Path, dst: Path, tensors: dict, metadata: dict, qinfo: dict | None = None) -> Path:
    """A copy of quantized checkpoint `src` with other tensors / shard metadata (and quantization.json)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not _is_weight_file(f) and not (qinfo is not None and f.name == spec.QUANT_FILE):
            (dst / f.name).write_bytes(f.read_bytes())
    write_sharded(dst, [OutTensor(k, tuple(v.shape), str(v.dtype).replace("torch.", ""), (lambda v=v: v))
                        for k, v in tensors.items()], n_shards=1, metadata=metadata)
    if qinfo is not None:
        (dst / spec.QUANT_FILE).write_text(json.dumps(qinfo))
    return dst


def test_zero_point_phase_writes_zeros_reloads_exactly_and_runs(demo, source, tmp_path):
    phase = _phase(bits=3, group_size=64, zero_point=True, scale_dtype="bfloat16")
    out = tmp_path / "zp"
    r = quantize_checkpoint(demo, out, phase)
    cfg_t = load_config(demo).transformer
    targets = [s.name for s in linear_targets(cfg_t, "slow")]
    q = json.loads((out / spec.QUANT_FILE).read_text())
    assert q["format_version"] == 2 and q["scheme"]["zero_point"] is True
    infos, _ = read_headers(out)
    for name in targets:
        d = q["tensors"][name]
        assert d["zero_point"] and d["scheme"] == "int3_g64_zp_bf16" and d["quantizer"] == "rtn"
        assert infos[name + ".zero"].dtype == "bfloat16" and tuple(infos[name + ".zero"].shape) == tuple(d["scale_shape"])
    # reload: exactly dequant(quant(W)) of the asymmetric scheme, every other tensor as stored
    scheme = scheme_of(phase)
    loaded = dequantized_state_dict(out)
    for name in targets:
        assert torch.equal(loaded[name], dequantize_tensor(quantize_tensor(name, source[name], scheme))), name
    # sizes: the prediction counts the zero points, byte for byte
    est = phase_estimate(load_config(demo), phase, codec_dtype=None)
    assert est.transformer_bytes == _weights_bytes(out) == r["predicted"]["transformer"]
    assert est.scale_bytes == 2 * sum(infos[n + ".scale"].nbytes for n in targets)
    # the model runs on the packed weights (dense route for INT3) and computes with exactly W'
    m = load_transformer(out, dtype=torch.float32)
    lin = m.get_submodule("layers.1.feed_forward.w2")
    assert isinstance(lin, QuantizedLinear) and lin.zero is not None
    x = torch.randn(2, lin.in_features)
    w_hat = dequantized_state_dict(out, torch.float32)[spec.HF_TEXT_PREFIX + "layers.1.feed_forward.w2.weight"]
    torch.testing.assert_close(lin(x), x @ w_hat.t(), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_missing_its_zero_points_is_refused(demo, tmp_path):
    out = tmp_path / "zp4"
    quantize_checkpoint(demo, out, _phase(zero_point=True), with_metrics=False)
    name = linear_targets(load_config(demo).transformer, "slow")[0].name
    infos, meta = read_headers(out)
    tensors = dict(iter_tensors(infos))
    del tensors[name + ".zero"]
    broken = _rewrite(out, tmp_path / "broken", tensors, meta)
    with pytest.raises(CheckpointError, match=r"zero"):
        load_quantized_tensors(broken)


def test_overrides_decide_each_linear_and_the_mixed_file_loads_and_runs(demo, source, tmp_path):
    phase = _phase(overrides=[
        {"match": "layers.0.*", "keep": True},
        {"match": "layers.1.feed_forward.w2", "bits": 8, "group_size": None},
        {"match": "layers.1.attention.*", "bits": 2, "zero_point": True, "quantizer": "mse"},
        {"match": "fast_layers.0.feed_forward.w1", "bits": 4, "group_size": 32},    # outside the target
    ])
    out = tmp_path / "mixed"
    r = quantize_checkpoint(demo, out, phase)
    q = json.loads((out / spec.QUANT_FILE).read_text())["tensors"]
    P = spec.HF_TEXT_PREFIX
    cfg_t = load_config(demo).transformer
    by_internal = {s.internal: s.name for s in transformer_manifest(cfg_t)}
    fast_w1 = by_internal["fast_layers.0.feed_forward.w1.weight"]
    assert not any(k.startswith(P + "layers.0.") for k in q)                          # kept as stored
    assert q[P + "layers.1.feed_forward.w2.weight"]["scheme"] == "int8_row"
    assert q[P + "layers.1.attention.wqkv.weight"]["scheme"] == "int2_g64_zp"
    assert q[P + "layers.1.attention.wqkv.weight"]["quantizer"] == "mse"
    assert q[P + "layers.1.attention.wqkv.weight"]["quantizer_args"]["grid"] == 41    # the settings used
    assert q[P + "layers.1.feed_forward.w1.weight"]["scheme"] == "int4_g64"           # the phase itself
    assert q[fast_w1]["scheme"] == "int4_g32"
    slow = [s.name for s in linear_targets(cfg_t, "slow")]
    assert set(q) == {n for n in slow if not n.startswith(P + "layers.0.")} | {fast_w1}
    # sizes: per tensor, byte for byte
    assert phase_estimate(load_config(demo), phase, codec_dtype=None).transformer_bytes == _weights_bytes(out)
    assert r["predicted"]["transformer"] == _weights_bytes(out)
    # reload: each tensor under its own scheme; kept tensors bit-identical
    loaded = dequantized_state_dict(out)
    w2 = P + "layers.1.feed_forward.w2.weight"
    assert torch.equal(loaded[w2], dequantize_tensor(quantize_tensor(w2, source[w2], Scheme("int", 8, None))))
    kept = P + "layers.0.attention.wo.weight"
    assert torch.equal(loaded[kept].view(torch.uint8), source[kept].view(torch.uint8))
    # the mixed model loads with one QuantizedLinear per quantized linear, a plain Linear for kept ones, and runs
    m = load_transformer(out, dtype=torch.float32)
    assert isinstance(m.get_submodule("layers.1.feed_forward.w2"), QuantizedLinear)
    assert isinstance(m.get_submodule("fast_layers.0.feed_forward.w1"), QuantizedLinear)
    assert not isinstance(m.get_submodule("layers.0.attention.wo"), QuantizedLinear)
    toks = torch.zeros(cfg_t.num_codebooks + 1, 6, dtype=torch.long)
    toks[0] = torch.arange(6) + 1
    assert torch.isfinite(m.forward_slow(toks).logits).all()


def test_a_version_1_file_still_loads(demo, source, tmp_path):
    """A checkpoint written by the version-1 writer (no zero_point / quantizer fields, format_version 1) loads
    through every reader, value for value."""
    out = tmp_path / "v2"
    quantize_checkpoint(demo, out, _phase(), with_metrics=False)
    infos, meta = read_headers(out)
    tensors = dict(iter_tensors(infos))
    qinfo = json.loads((out / spec.QUANT_FILE).read_text())
    v1 = {k: {f: v for f, v in d.items() if f not in ("zero_point", "quantizer", "quantizer_args")}
          for k, d in qinfo["tensors"].items()}
    for d in v1.values():
        d["format_version"] = 1
    q1 = {"format_version": 1, "phase": {k: qinfo["phase"][k] for k in ("name", "method", "bits", "group_size",
                                                                         "target", "scale_dtype")},
          "scheme": {k: v for k, v in qinfo["scheme"].items() if k != "zero_point"}, "tensors": v1}
    old = _rewrite(out, tmp_path / "v1", tensors,
                   {"format": "pt", "quantization": json.dumps({"format_version": 1, "tensors": v1})}, q1)
    with safe_open(str(transformer_files(old)[0]), "pt") as f:
        assert json.loads(f.metadata()["quantization"])["format_version"] == 1
    a, b = dequantized_state_dict(old), dequantized_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = load_transformer(old, dtype=torch.float32)
    assert isinstance(m.get_submodule("layers.0.attention.wqkv"), QuantizedLinear)
    with pytest.raises(CheckpointError, match="format_version"):
        (old / spec.QUANT_FILE).write_text(json.dumps(dict(q1, format_version=3)))
        load_quantized_tensors(old)
