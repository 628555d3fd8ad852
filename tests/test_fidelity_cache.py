"""Fidelity with one model resident at a time: the base's teacher-forced outputs cached on disk (keyed by a
digest of the checkpoint and the token matrix), layer groups read from the quantized checkpoint; equal to the
two-models-resident results on the demo checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fishlab.demo import build_demo_checkpoint
from fishlab.fidelity import (CachedBase, cached_model_outputs, fidelity_report, kl_by_layer_group,
                              kl_by_layer_group_from_checkpoint, load_model_outputs, model_outputs, outputs_digest,
                              quantized_linears_from_checkpoint, reference_tokens, save_model_outputs)
from fishlab.model.load import load_transformer
from fishlab.phases import load_phase
from fishlab.quant.apply import quantize_checkpoint
from fishlab.quant.qlinear import QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("fc_demo") / "demo")


@pytest.fixture(scope="module")
def qdir(base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fc_quant") / "2a"
    quantize_checkpoint(base_dir, out, load_phase("2a"), with_metrics=False)
    return out


@pytest.fixture(scope="module")
def base(base_dir):
    return load_transformer(base_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def matrix(base):
    C = base.cfg.num_codebooks
    prompt = torch.zeros(C + 1, 6, dtype=torch.long)
    prompt[0] = torch.tensor([5, 9, 17, 33, 40, base.cfg.eos_token_id + 28])
    return reference_tokens(base, prompt, 10, seed=None)


def test_digest_follows_checkpoint_matrix_and_dtype(base_dir, matrix, tmp_path):
    tokens, P = matrix
    d = outputs_digest(base_dir, tokens, P, torch.float32)
    assert d == outputs_digest(base_dir, tokens.clone(), P, "float32")
    other = tokens.clone()
    other[1, -1] = (other[1, -1] + 1) % 7
    assert len({d, outputs_digest(base_dir, other, P, torch.float32), outputs_digest(base_dir, tokens, P + 1,
                torch.float32), outputs_digest(base_dir, tokens, P, torch.bfloat16)}) == 4
    shard = next(f for f in base_dir.iterdir() if f.suffix == ".safetensors")
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # a rewritten checkpoint: a new key
        assert outputs_digest(base_dir, tokens, P, torch.float32) != d
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_save_load_roundtrip_exact(base, matrix, tmp_path):
    tokens, P = matrix
    out = model_outputs(base, tokens, P)
    p = save_model_outputs(tmp_path / "o.safetensors", out, "abc")
    back = load_model_outputs(p, "abc")
    assert back.slow_logp.dtype == torch.float64
    assert torch.equal(back.slow_logp, out.slow_logp) and torch.equal(back.fast_logp, out.fast_logp)
    assert load_model_outputs(p, "other") is None and load_model_outputs(tmp_path / "none.safetensors") is None
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]      # atomic: no temp left


def test_cached_outputs_and_report_equal_two_resident_models(base_dir, qdir, base, matrix, tmp_path):
    tokens, P = matrix
    first = cached_model_outputs(base_dir, tokens, P, tmp_path, torch.float32)
    again = cached_model_outputs(base_dir, tokens, P, tmp_path, torch.float32)
    assert isinstance(first, CachedBase) and not first.reused and again.reused and again.path == first.path
    direct = model_outputs(base, tokens, P)
    assert torch.equal(again.outputs.slow_logp, direct.slow_logp)
    assert torch.equal(again.outputs.fast_logp, direct.fast_logp)
    assert again.weight_bytes["total"] > 0
    q = load_transformer(qdir, dtype=torch.float32)
    ref = fidelity_report(base, q, tokens, P)
    got = fidelity_report(again, q, tokens, P, again.outputs)
    assert got == ref


def test_layer_groups_from_checkpoint_equal_swapping_a_resident_model(base_dir, qdir, base, matrix):
    tokens, P = matrix
    q = load_transformer(qdir, dtype=torch.float32)
    ref = kl_by_layer_group(base, q, tokens, P)
    got = kl_by_layer_group_from_checkpoint(base, qdir, tokens, P)
    assert [r["group"] for r in got] == [r["group"] for r in ref] and got == ref
    donor = quantized_linears_from_checkpoint(qdir, ["layers.1.attention.wo"], "cpu", torch.float32)
    m = donor.get_submodule("layers.1.attention.wo")
    assert isinstance(m, QuantizedLinear) and m.route_name == "dense"
    assert [n for n, _ in donor.named_modules()][-1] == "layers.1.attention.wo" and len(list(donor.modules())) == 5
    with pytest.raises(ValueError, match="not quantized"):
        quantized_linears_from_checkpoint(qdir, ["embeddings"], "cpu", torch.float32)


def test_save_load_without_fast_outputs(tmp_path):
    """A text LM's outputs (no fast AR: fast_logp None, with next-token NLLs) round-trip too."""
    from fishlab.fidelity import ModelOutputs
    out = ModelOutputs(torch.randn(5, 7, dtype=torch.float64), None, torch.rand(5, dtype=torch.float64))
    back = load_model_outputs(save_model_outputs(tmp_path / "t.safetensors", out, "d"), "d")
    assert back.fast_logp is None and torch.equal(back.slow_logp, out.slow_logp)
    assert torch.equal(back.slow_nll, out.slow_nll)
