"""Full sampling (spec s2pro-model.md §8.2-§8.4): top-p/top-k/temperature, the exponential race, RAS, RNG
handling, stop rule. Mechanics tests use the golden-A float32 model (tiny); determinism uses the demo
checkpoint (bf16, the real dtype path)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import fishlab.generate as gen
from fishlab.generate import (SamplingParams, as_model_scalar, exponential_race, frames_to_codes, generate,
                              generate_sampled, make_fast_sampler, make_slow_sampler, removal_mask, sample,
                              sample_greedy, stop_reason)
from fishlab.model.load import load_transformer


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one torch thread


def logits_of(probs, dtype=torch.float32):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).to(dtype)


def kept(logits, top_p, top_k=30):
    return set(torch.nonzero(~removal_mask(logits, top_p, top_k)).flatten().tolist())


def draws(logits, n, temperature=1.0, top_p=1.0, top_k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [int(sample(logits, temperature, top_p, top_k, g)) for _ in range(n)]


# ---- bf16 scalars ----

@pytest.mark.parametrize("value,rounded", [(0.8, 0.80078125), (0.9, 0.8984375), (0.7, 0.69921875), (1.0, 1.0)])
def test_bf16_rounding_of_scalars(value, rounded):
    t = as_model_scalar(value, torch.bfloat16)
    assert t.dim() == 0 and t.dtype == torch.bfloat16 and t.item() == rounded


def test_top_p_compared_in_logits_dtype():
    # in bf16 the cumulative mass of the top two is 0.80078125 (0.5 + 0.30078125): equal to top_p = 0.8 after
    # bf16 rounding, so "cum > top_p" is False and the second token stays; an unrounded 0.8 would remove it
    lg = logits_of([0.5, 0.3, 0.2], torch.bfloat16)
    cum = torch.cumsum(torch.softmax(lg, -1), -1)
    assert cum[1].item() == 0.80078125 and cum[1].item() > 0.8
    assert kept(lg, 0.8) == {0, 1}
    assert kept(lg, 0.79) == {0}


# ---- top-p / top-k ----

def test_top_p_crossing_token_removed():
    lg = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(lg, 0.7) == {0}            # cum 0.8 > 0.7: token 1 crosses and is removed (HF would keep it)
    assert kept(lg, 0.85) == {0, 1}        # cum 0.95 > 0.85 removes token 2
    assert kept(lg, 1.0) == {0, 1, 2, 3}
    assert set(draws(lg, 200, top_p=0.85)) == {0, 1}


def test_top1_alone_above_top_p_keeps_only_it():
    lg = logits_of([0.05, 0.9, 0.05])
    assert kept(lg, 0.5) == {1}
    assert set(draws(lg, 100, top_p=0.5, temperature=1.9)) == {1}


def test_top_k_cut():
    lg = logits_of([0.1, 0.3, 0.05, 0.25, 0.2, 0.1])
    assert kept(lg, 1.0, top_k=3) == {1, 3, 4}
    assert kept(lg, 1.0, top_k=1) == {1}
    assert set(draws(lg, 200, top_k=3)) == {1, 3, 4}
    # equal logits: the stable sort keeps vocabulary order, so the first k indices survive
    assert kept(torch.zeros(8), 1.0, top_k=3) == {0, 1, 2}


def test_removed_in_vocabulary_order_not_sorted_order():
    lg = logits_of([0.02, 0.02, 0.6, 0.02, 0.34])
    assert kept(lg, 0.95) == {2, 4}


def test_temperature_applied_after_top_p():
    lg = logits_of([0.5, 0.3, 0.15, 0.05])
    for t in (0.1, 0.5, 1.0, 1.9):
        assert set(draws(lg, 300, temperature=t, top_p=0.85)) <= {0, 1}
    # tempering first would change the kept set: at T=0.1 nearly all mass is on token 0 and at T=1.9 the crossing
    # point moves; the kept set is computed on the untempered distribution only:
    assert kept(lg, 0.85) == {0, 1}
    # and the temperature does act on the draw among the kept tokens: p(0) = .5^(1/T) / (.5^(1/T) + .3^(1/T))
    for t in (1.0, 0.5):
        n = 3000
        freq = draws(lg, n, temperature=t, top_p=0.85, seed=1).count(0) / n
        a, b = 0.5 ** (1 / t), 0.3 ** (1 / t)
        assert abs(freq - a / (a + b)) < 0.03, (t, freq, a / (a + b))


def test_exponential_race_ties_go_to_lowest_index():
    probs = torch.tensor([0.1, 0.45, 0.45])
    assert int(exponential_race(probs, torch.tensor([0.5, 0.5, 0.5]))) == 1
    assert int(exponential_race(torch.tensor([0.25] * 4), torch.tensor([0.5] * 4))) == 0
    # u == 0 -> e = inf -> ratio 0 for every token: the reference's argmax would return 0 even if removed;
    # with the removal mask the lowest KEPT index wins
    removed = torch.tensor([True, False, True, False])
    p = torch.tensor([0.0, 0.6, 0.0, 0.4])
    assert int(exponential_race(p, torch.zeros(4))) == 0
    assert int(exponential_race(p, torch.zeros(4), removed)) == 1


def test_sample_reads_noise_from_the_generator_only():
    lg = logits_of([0.25, 0.25, 0.25, 0.25], torch.bfloat16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = draws(lg, 50, seed=7)
    assert torch.equal(state, torch.get_rng_state())          # the global RNG is untouched
    assert a == draws(lg, 50, seed=7)
    assert len(set(a)) > 1
    # exactly one uniform per logit per draw: the generator advances by V bf16 uniforms
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample(lg, 1.0, 1.0, 30, g1)
    torch.rand(4, generator=g2, dtype=torch.bfloat16)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_sample_returns_long_scalar_and_rejects_2d():
    lg = logits_of([0.7, 0.3], torch.bfloat16)
    out = sample(lg, 0.8, 0.8, 30, torch.Generator().manual_seed(0))
    assert out.dim() == 0 and out.dtype == torch.long
    with pytest.raises(ValueError, match="1-D"):
        sample(lg[None], 0.8, 0.8, 30)


@pytest.mark.parametrize("kw,match", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
                                      (dict(temperature=0.0), "temperature"), (dict(temperature=2.0), "temperature"),
                                      (dict(top_k=0), "top_k"), (dict(temperature=float("nan")), "temperature")])
def test_parameter_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_parameter_limits_accepted():
    SamplingParams(temperature=1.99, top_p=1.0, top_k=1)
    SamplingParams(temperature=0.01, top_p=0.01)


# ---- RAS (§8.3) ----

SEM = (100, 199)
EOS = 50


def stub_model():
    return SimpleNamespace(cfg=SimpleNamespace(semantic_begin_id=SEM[0], semantic_end_id=SEM[1]),
                           dtype=torch.float32, device=torch.device("cpu"))


def scripted(monkeypatch, values):
    calls = []
    it = iter(values)

    def fake(logits, temperature, top_p, top_k, generator=None):
        calls.append((float(temperature), float(top_p), top_k))
        return torch.tensor(next(it))
    monkeypatch.setattr(gen, "sample", fake)
    return calls


def window_with(*tokens):
    w = torch.zeros(11, 10, dtype=torch.long)
    w[0, -len(tokens):] = torch.tensor(tokens)
    return w


def test_ras_replaces_repeated_semantic_token(monkeypatch):
    calls = scripted(monkeypatch, [150, 160])
    s = make_slow_sampler(stub_model(), SamplingParams(0.8, 0.8, 30), None)
    assert int(s(torch.zeros(300), window_with(120, 150))) == 160
    # normal draw first, then the high draw with temperature 1.0 and top_p 0.9 (rounded), same top_k
    assert calls == [(0.800000011920929, 0.800000011920929, 30), (1.0, 0.8999999761581421, 30)]


def test_ras_keeps_token_not_in_window(monkeypatch):
    calls = scripted(monkeypatch, [151, 160])
    s = make_slow_sampler(stub_model(), SamplingParams(), None)
    assert int(s(torch.zeros(300), window_with(120, 150))) == 151
    assert len(calls) == 2                                   # t_high drawn anyway (consumes RNG)


def test_ras_never_replaces_non_semantic(monkeypatch):
    scripted(monkeypatch, [EOS, 160])
    s = make_slow_sampler(stub_model(), SamplingParams(), None)
    assert int(s(torch.zeros(300), window_with(EOS, 150))) == EOS


def test_ras_off_without_window(monkeypatch):
    calls = scripted(monkeypatch, [150, 160])
    s = make_slow_sampler(stub_model(), SamplingParams(), None)
    assert int(s(torch.zeros(300), None)) == 150
    assert len(calls) == 2


def test_ras_zero_window_never_matches(monkeypatch):
    scripted(monkeypatch, [SEM[0], 160])
    s = make_slow_sampler(stub_model(), SamplingParams(), None)
    assert int(s(torch.zeros(300), torch.zeros(11, 10, dtype=torch.long))) == SEM[0]


def test_fast_sampler_has_no_ras(monkeypatch):
    calls = scripted(monkeypatch, [7])
    f = make_fast_sampler(stub_model(), SamplingParams(0.7, 0.9, 5), None)
    assert int(f(torch.zeros(32))) == 7
    assert calls == [(0.699999988079071, 0.8999999761581421, 5)]


# ---- the loop on the golden model ----

@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return load_transformer(golden_dir / "transformer")


@pytest.fixture(scope="module")
def golden_prompt(golden_dir):
    from safetensors.torch import load_file
    return load_file(str(golden_dir / "transformer" / "golden.safetensors"))["prompt_tokens"]


def test_prefill_token_not_ras_and_not_in_window(golden_model, golden_prompt):
    cfg = golden_model.cfg
    windows, tokens = [], []
    script = iter([cfg.semantic_begin_id + k for k in (3, 3, 5, 3, 7, 9, 11)])

    def slow(logits, window):
        windows.append(None if window is None else window.clone())
        t = torch.tensor(next(script))
        tokens.append(int(t))
        return t

    frames = generate(golden_model, golden_prompt, 7, slow, sample_greedy)
    assert windows[0] is None                                         # prefill: no window
    assert torch.equal(windows[1], torch.zeros_like(windows[1]))      # f0 never entered the window
    for n in range(2, 7):
        w = windows[n][0]
        assert w[-(n - 1):].tolist() == tokens[1:n]                   # decode-step tokens only, newest last
        assert (w[:-(n - 1)] == 0).all()
    assert windows[3][1:, -1].tolist() == frames[1:, 2].tolist() and windows[1].shape == (cfg.num_codebooks + 1, 10)


def test_stop_rule_and_dropped_last_frame(golden_model, golden_prompt):
    cfg = golden_model.cfg
    eos, s0 = cfg.eos_token_id, cfg.semantic_begin_id
    seq = iter([eos, s0 + 1, s0 + 2, eos, s0 + 4])                    # f0 = eos is NOT tested

    frames = generate(golden_model, golden_prompt, 10, lambda l, w: torch.tensor(next(seq)), sample_greedy)
    assert frames[0].tolist() == [eos, s0 + 1, s0 + 2, eos]           # stops right after appending eos
    assert frames[1].tolist() == [0, 1, 2, 0]                         # c0 = clamp(tok - s0): 0 for eos
    assert stop_reason(frames, eos) == "eos"
    codes = frames_to_codes(frames)
    assert torch.equal(codes, frames[1:, :3])                         # the eos frame dropped

    seq = iter([s0 + k for k in range(5)])
    frames = generate(golden_model, golden_prompt, 5, lambda l, w: torch.tensor(next(seq)), sample_greedy)
    assert frames.shape[1] == 5 and stop_reason(frames, eos) == "length"
    assert frames_to_codes(frames).shape[1] == 4                      # a real frame is lost on the length limit
    one = generate(golden_model, golden_prompt, 1, lambda l, w: torch.tensor(eos), sample_greedy)
    assert one.shape[1] == 1 and stop_reason(one, eos) == "length"   # f0 alone is never an eos stop


def test_sampled_on_golden_model_emits_only_allowed_tokens(golden_model, golden_prompt):
    cfg = golden_model.cfg
    frames = generate_sampled(golden_model, golden_prompt, 6, temperature=1.5, top_p=1.0, top_k=30, seed=3)
    tok = frames[0]
    ok = ((tok >= cfg.semantic_begin_id) & (tok <= cfg.semantic_end_id)) | (tok == cfg.eos_token_id)
    assert ok.all()
    assert (frames[2:] >= 0).all() and (frames[2:] < cfg.codebook_size).all()


def test_sampled_top_k_1_equals_greedy(golden_model, golden_prompt, golden_dir):
    from safetensors.torch import load_file
    ref = load_file(str(golden_dir / "transformer" / "golden.safetensors"))["generate_frames"]
    frames = generate_sampled(golden_model, golden_prompt, ref.shape[1], temperature=0.7, top_p=0.9, top_k=1, seed=5)
    assert torch.equal(frames, ref)


# ---- determinism on the demo checkpoint (bf16) ----

@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from fishlab.demo import build_demo_checkpoint
    d = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    return load_transformer(d), d


def test_seeded_determinism_demo(demo_model):
    model, d = demo_model
    from fishlab.prompt import build_tts_prompt
    from fishlab.tokenizer import load_tokenizer
    prompt = build_tts_prompt(load_tokenizer(d), "Hello there.", model.cfg.num_codebooks)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = generate_sampled(model, prompt, 8, seed=11)
    assert torch.equal(state, torch.get_rng_state())
    b = generate_sampled(model, prompt, 8, seed=11)
    c = generate_sampled(model, prompt, 8, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(generate_sampled(model, prompt, 8, generator=g), a)
    with pytest.raises(ValueError, match="either seed or generator"):
        generate_sampled(model, prompt, 8, seed=1, generator=g)
    with pytest.raises(ValueError, match="top_p"):
        generate_sampled(model, prompt, 8, top_p=0)
    assert not math.isnan(float(a.float().mean()))
