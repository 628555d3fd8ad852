"""The decode path built for speed: the sliced semantic head, the static decode step (whole KV cache under a
position mask, no host synchronisation) and compiled generation, against the golden set and the plain paths."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fishlab.config import preset
from fishlab.generate import generate, generate_greedy, generate_sampled, sample_greedy
from fishlab.model.dualar import allowed_slow_ids
from fishlab.model.load import load_transformer

from test_golden_transformer import TOL, assert_close, golden_root

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tdir():
    return golden_root()


@pytest.fixture(scope="module")
def g(tdir):
    return load_file(str(tdir / "golden.safetensors"))


@pytest.fixture(scope="module")
def model(tdir):
    return load_transformer(tdir, dtype=torch.float32)


def test_allowed_ids_are_4097_of_155776_for_s2pro():
    cfg = preset("s2-pro").transformer
    ids = allowed_slow_ids(cfg)
    assert ids.numel() == 4097 and cfg.vocab_size == 155776
    assert ids[0] == cfg.eos_token_id and torch.equal(ids[1:], torch.arange(cfg.semantic_begin_id,
                                                                           cfg.semantic_end_id + 1))
    assert bool((ids[1:] > ids[:-1]).all())                    # ascending: argmax ties as over the vocab


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sliced_head_equals_full_head_columns(tdir, g, dtype):
    m = load_transformer(tdir, dtype=dtype)
    out = m.forward_slow(g["input_tokens"])
    sliced = m.forward_slow(g["input_tokens"], allowed_only=True)
    ids = allowed_slow_ids(m.cfg)
    assert sliced.logits.shape == (g["input_tokens"].shape[1], ids.numel())
    assert torch.equal(sliced.hidden, out.hidden)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(sliced.logits, out.logits[:, ids], **tol)


@torch.no_grad()
def test_static_decode_step_equals_golden_incremental(model, g):
    """decode_step_static over a cache much longer than the positions in use, its stale slots filled with
    garbage: the mask hides them, logits (allowed ids) and hidden equal the golden incremental outputs."""
    x, pos = g["input_tokens"], g["incremental_positions"]
    T = x.shape[1]
    n_steps = pos.numel() - 1
    model.setup_caches(model.cfg.max_seq_len)
    assert model.cache_length > T + 8
    for b in model.layers:
        b.attention.kv_cache.k_cache.normal_()
        b.attention.kv_cache.v_cache.normal_(0, 100)
    model.prefill(x[:, : T - n_steps])
    ids = allowed_slow_ids(model.cfg)
    from fishlab.model.dualar import _math_sdpa
    for j, t in enumerate(range(T - n_steps, T)):
        with _math_sdpa():
            logits, hidden = model.decode_step_static(x[:, t], torch.tensor([t]))
        assert_close(logits, g["incremental_logits"][j + 1][ids], f"static decode logits at {t}")
        assert_close(hidden, g["incremental_hidden"][j + 1], f"static decode hidden at {t}")


@torch.no_grad()
def test_static_fast_step_equals_fast_step(model, g):
    pos = g["fast_positions"]
    h = g["slow_hidden"][pos[:1]].reshape(1, 1, -1)
    codes = g["fast_teacher_codes"][0]
    ref = model.fast_logits_teacher_forced(h.reshape(1, -1), codes.reshape(1, -1))[0]
    model.fast_step(h, 0)                                   # fill slot 0 (stale slots 1.. hold older frames)
    got = [model.fast_step_static(h, torch.tensor([0]))[0, 0]]
    for i in range(1, model.cfg.num_codebooks):
        x = model.fast_embeddings(codes[i - 1:i].reshape(1, 1))
        got.append(model.fast_step_static(x, torch.tensor([i]))[0, 0])
    assert_close(torch.stack(got), ref, "fast_step_static vs the teacher-forced fast logits", **TOL)


def test_trace_does_not_change_sampling(model, g):
    """The samplers see the sliced head's logits whether or not a trace is recorded (the trace adds the full
    head's logits of the same hidden states)."""
    a = generate_sampled(model, g["prompt_tokens"], 6, seed=4, temperature=1.2, top_p=0.95)
    b, tr = generate_sampled(model, g["prompt_tokens"], 6, seed=4, temperature=1.2, top_p=0.95, return_trace=True)
    assert torch.equal(a, b) and tr.stacked()["slow_logits"].shape[-1] == model.cfg.vocab_size


def test_compiled_and_eager_greedy_give_identical_frames(model, g):
    """torch.compile(mode="reduce-overhead", fullgraph=True) of the slow step and the fast step: fullgraph fails
    on any graph break, so this also proves the steps have no host synchronisation. Eager and compiled frames
    equal each other and the golden frames; a second call reuses the graphs."""
    ref = g["generate_frames"]
    n = ref.shape[1]
    eager = generate_greedy(model, g["prompt_tokens"], n)
    compiled = generate_greedy(model, g["prompt_tokens"], n, compile=True)
    assert torch.equal(eager, ref) and torch.equal(compiled, eager)
    assert model.cache_length % 256 == 0 or model.cache_length == model.cfg.max_seq_len
    again = generate(model, g["prompt_tokens"], n, sample_greedy, sample_greedy, compile=True)
    assert torch.equal(again, ref)
    # sampled decoding with the slow and fast steps compiled (sampling eager between them): same frames
    a = generate_sampled(model, g["prompt_tokens"], 6, seed=3, temperature=1.2, top_p=0.95)
    b = generate_sampled(model, g["prompt_tokens"], 6, seed=3, temperature=1.2, top_p=0.95, compile=True)
    assert torch.equal(a, b)
