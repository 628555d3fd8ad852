"""The clean-room DualAR transformer against the golden reference tensors (golden set README §1).

The golden directory comes from $FISHLAB_GOLDEN (default <repo>/../shared/golden/A; a relative value is taken
relative to the repo root). Its transformer files are under $FISHLAB_GOLDEN/transformer/. A missing directory
FAILS the tests: the golden data is the point of this file. No size is hard-coded: everything is read from
config.json and the tensor shapes, so any golden set of the same format works.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fishlab.config import load_transformer_config
from fishlab.generate import frames_to_codes, generate_greedy, semantic_bias
from fishlab.manifest import linear_targets, transformer_manifest
from fishlab.model.dualar import DualARTransformer, KVCache, linear_names, replace_linears, rope_table
from fishlab.model.load import CheckpointError, build_transformer, load_transformer

REPO = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-4, rtol=1e-4)   # golden README: float32 logits / hidden / embeddings


def golden_root() -> Path:
    raw = os.environ.get("FISHLAB_GOLDEN")
    p = Path(raw) if raw else Path("..") / "shared" / "golden" / "A"
    p = p if p.is_absolute() else (REPO / p)
    t = p.resolve() / "transformer"
    needed = [t / n for n in ("config.json", "model.safetensors", "golden.safetensors")]
    absent = [str(n) for n in needed if not n.exists()]
    if absent:
        pytest.fail(f"golden transformer files not found: {', '.join(absent)}. Set FISHLAB_GOLDEN to a golden "
                    f"set directory (default <repo>/../shared/golden/A, resolved relative to {REPO}).",
                    pytrace=False)
    return t


@pytest.fixture(scope="module")
def tdir() -> Path:
    return golden_root()


@pytest.fixture(scope="module")
def g(tdir) -> dict:
    return load_file(str(tdir / "golden.safetensors"))


@pytest.fixture(scope="module")
def cfg(tdir):
    return load_transformer_config(tdir)


@pytest.fixture(scope="module")
def model(tdir) -> DualARTransformer:
    m = load_transformer(tdir, dtype=torch.float32)
    assert m.dtype == torch.float32
    return m


def assert_close(actual, expected, what, **tol):
    tol = tol or TOL
    actual = actual.detach().float().cpu()
    expected = expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, **tol), f"{what}: max abs diff {diff:.3g} (tol {tol})"


def semantic_mask(cfg, tok: torch.Tensor) -> torch.Tensor:
    return (tok >= cfg.semantic_begin_id) & (tok <= cfg.semantic_end_id)


# ----------------------------------------------------------------------------------------------------
# golden directory handling
# ----------------------------------------------------------------------------------------------------

def test_missing_golden_dir_fails_not_skips(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHLAB_GOLDEN", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match="golden transformer files not found"):
        golden_root()


def test_golden_shapes_agree_with_config(cfg, g):
    C = cfg.num_codebooks
    T = g["input_tokens"].shape[1]
    assert g["input_tokens"].shape == (C + 1, T)
    assert g["slow_logits"].shape == (T, cfg.vocab_size)
    assert g["slow_hidden"].shape == (T, cfg.dim)
    assert g["fast_logits"].shape[1:] == (C, cfg.codebook_size)
    assert torch.equal(g["prompt_tokens"], g["input_tokens"][:, : g["prompt_tokens"].shape[1]])


# ----------------------------------------------------------------------------------------------------
# slow AR
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_slow_input_embeds(model, g):
    assert_close(model.embed(g["input_tokens"]), g["slow_input_embeds"], "slow_input_embeds")


@torch.no_grad()
def test_slow_logits_and_hidden_all_positions(model, g):
    out = model.forward_slow(g["input_tokens"], input_pos=None, return_all=True)
    assert_close(out.logits, g["slow_logits"], "slow_logits")
    assert_close(out.hidden, g["slow_hidden"], "slow_hidden")
    last = model.forward_slow(g["input_tokens"], return_all=False)
    assert_close(last.logits[-1], g["slow_logits"][-1], "slow_logits (last only)")


@torch.no_grad()
def test_slow_logits_through_kv_cache(model, g):
    """Prefill with return_all through the cache, and a chunked prefill that needs a real (non-causal-square)
    mask: both reproduce slow_logits."""
    x = g["input_tokens"]
    T = x.shape[1]
    model.setup_caches(T)
    out = model.prefill(x, return_all=True)
    assert_close(out.logits, g["slow_logits"], "slow_logits via cache (prefill)")
    model.setup_caches(T)
    a = T // 2
    model.forward_slow(x[:, :a], torch.arange(a))
    rest = model.forward_slow(x[:, a:], torch.arange(a, T))
    assert_close(rest.logits, g["slow_logits"][a:], "slow_logits via cache (chunked prefill)")
    assert_close(rest.hidden, g["slow_hidden"][a:], "slow_hidden via cache (chunked prefill)")


@torch.no_grad()
def test_incremental_logits_and_hidden(model, g):
    x, pos = g["input_tokens"], g["incremental_positions"]
    T = x.shape[1]
    n_steps = pos.numel() - 1
    assert pos.tolist() == list(range(T - n_steps - 1, T))
    model.setup_caches(T)
    first = model.prefill(x[:, : T - n_steps])
    logits, hidden = [first.logits.reshape(-1)], [first.hidden.reshape(-1)]
    for t in range(T - n_steps, T):
        out = model.decode_step(x[:, t], t)
        logits.append(out.logits)
        hidden.append(out.hidden)
    assert_close(torch.stack(logits), g["incremental_logits"], "incremental_logits")
    assert_close(torch.stack(hidden), g["incremental_hidden"], "incremental_hidden")
    assert_close(torch.stack(logits), g["slow_logits"][pos], "incremental vs full-sequence logits")


# ----------------------------------------------------------------------------------------------------
# fast AR
# ----------------------------------------------------------------------------------------------------

def test_fast_teacher_codes_are_the_next_frames(g):
    x, pos, codes = g["input_tokens"], g["fast_positions"], g["fast_teacher_codes"]
    T = x.shape[1]
    nxt = torch.cat([x[1:, 1:], g["generate_frames"][1:, -1:]], dim=1)      # column t = codes of frame t+1
    assert pos[-1].item() == T - 1
    assert torch.equal(codes, nxt[:, pos].T)


@torch.no_grad()
def test_fast_logits_teacher_forced(model, g):
    pos = g["fast_positions"]
    got = model.fast_logits_teacher_forced(g["slow_hidden"][pos], g["fast_teacher_codes"])
    assert_close(got, g["fast_logits"], "fast_logits")
    ours_hidden = model.forward_slow(g["input_tokens"]).hidden[pos]
    assert_close(model.fast_logits_teacher_forced(ours_hidden, g["fast_teacher_codes"]), g["fast_logits"],
                 "fast_logits (own slow hidden)")
    one = model.fast_logits_teacher_forced(g["slow_hidden"][pos[0]], g["fast_teacher_codes"][0])
    assert_close(one, g["fast_logits"][0], "fast_logits (unbatched)")


@torch.no_grad()
def test_fast_parallel_equals_per_step(model, g):
    pos = g["fast_positions"]
    par = model.fast_forward_parallel(g["slow_hidden"][pos], g["fast_teacher_codes"])
    assert_close(par, g["fast_logits"], "parallel fast AR vs per-step fast_logits")


# ----------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------

def test_semantic_bias(model, g):
    assert_close(semantic_bias(model), g["generate_semantic_bias"], "generate_semantic_bias", atol=0, rtol=0)


def test_generate_greedy(model, g, cfg):
    ref = g["generate_frames"]
    n = ref.shape[1]
    frames, trace = generate_greedy(model, g["prompt_tokens"], n, return_trace=True)
    t = trace.stacked()
    assert torch.equal(frames.cpu(), ref), f"generate_frames differ:\n{frames}\nvs\n{ref}"
    assert torch.equal(t["positions"], g["generate_positions"])
    assert_close(t["slow_logits"], g["generate_slow_logits"], "generate_slow_logits")
    assert_close(t["slow_hidden"], g["generate_slow_hidden"], "generate_slow_hidden")
    assert_close(t["fast_logits"], g["generate_fast_logits"], "generate_fast_logits")
    # margins: our distance from a tie matches the reference's, and is far above our numeric error
    biased = t["slow_logits"] + g["generate_semantic_bias"]
    top2 = biased.topk(2, dim=-1).values
    assert_close(top2[:, 0] - top2[:, 1], g["generate_margin_slow"], "generate_margin_slow")
    f2 = t["fast_logits"][:, 1:].topk(2, dim=-1).values
    assert_close(f2[..., 0] - f2[..., 1], g["generate_margin_fast"], "generate_margin_fast")
    assert g["generate_margin_slow"].min() > 100 * TOL["atol"] and g["generate_margin_fast"].min() > 100 * TOL["atol"]
    # frame structure: row 1 = clamp(token - semantic_begin), codes are argmax of the recorded fast logits
    c0 = (frames[0] - cfg.semantic_begin_id).clamp(0, cfg.codebook_size - 1)
    assert torch.equal(frames[1], c0)
    assert torch.equal(frames[2:], t["fast_logits"][:, 1:].argmax(-1).T)
    codes = frames_to_codes(frames)
    assert torch.equal(codes, frames[1:, :-1])


def test_generate_stops_after_im_end(model, g, cfg):
    """Force <|im_end|> from the first decode step on: the frame is appended, then generation stops; the
    prefill frame is never tested."""
    im_end = cfg.eos_token_id

    def slow(logits, window):
        return torch.tensor(im_end)                    # prefill also picks im_end: must not stop there

    from fishlab.generate import generate, sample_greedy
    frames = generate(model, g["prompt_tokens"], 10, slow, sample_greedy)
    assert frames.shape[1] == 2 and frames[0].tolist() == [im_end, im_end]
    assert frames[1].tolist() == [0, 0]                # c0 = clamp(im_end - semantic_begin) = 0
    assert frames_to_codes(frames).shape == (cfg.num_codebooks, 1)


# ----------------------------------------------------------------------------------------------------
# training-mode tensors (the reference's train/inference embedding quirk)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_train_token_logits_quirk(model, g, cfg):
    x = g["input_tokens"]
    sem = semantic_mask(cfg, x[0])
    first = int(sem.nonzero()[0])
    ours = model.forward_slow(x).logits
    train = g["train_token_logits"]
    # identical before the first semantic position ...
    assert_close(ours[:first], train[:first], "inference vs train logits before the first semantic position")
    # ... and clearly different from it on: training embeds semantic columns without 1/sqrt(C+1)
    assert (ours[first:] - train[first:]).abs().max() > 1000 * TOL["atol"]
    # the training embedding (no scale) reproduces them everywhere
    t_out = model.forward_slow(x, scale_codebooks=False)
    assert_close(t_out.logits, train, "train_token_logits (scale_codebooks=False)")


@torch.no_grad()
def test_train_codebook_logits(model, g, cfg):
    """Training-mode fast AR: C parallel causal positions on the TRAINING hidden states at the positions whose
    label is semantic, teacher codes = the labels."""
    labels, pos = g["train_labels"], g["train_positions"]
    assert torch.equal(pos, semantic_mask(cfg, labels[0]).nonzero().flatten())
    hidden = model.forward_slow(g["input_tokens"], scale_codebooks=False).hidden[pos]
    got = model.fast_forward_parallel(hidden, labels[1:, pos].T)
    assert_close(got, g["train_codebook_logits"], "train_codebook_logits")


# ----------------------------------------------------------------------------------------------------
# model structure, KV cache, masks, dtypes
# ----------------------------------------------------------------------------------------------------

def test_parameter_names_are_manifest_internal_names(model, cfg):
    sd = model.state_dict()
    assert set(sd) == {s.internal for s in transformer_manifest(cfg)}
    for s in transformer_manifest(cfg):
        assert tuple(sd[s.internal].shape) == tuple(s.shape), s.internal
    assert set(linear_names(model)) == {s.internal.removesuffix(".weight") for s in linear_targets(cfg, "all")}


def test_rope_table_is_bf16_and_exact_rows(cfg):
    pos = torch.arange(cfg.max_seq_len)
    full = rope_table(pos, cfg.head_dim, cfg.rope_base)
    assert full.dtype == torch.bfloat16 and full.shape == (cfg.max_seq_len, cfg.head_dim // 2, 2)
    some = torch.tensor([0, 1, cfg.max_seq_len - 1])
    assert torch.equal(rope_table(some, cfg.head_dim, cfg.rope_base), full[some])
    assert torch.equal(full[0, :, 0], torch.ones(cfg.head_dim // 2, dtype=torch.bfloat16))


def test_kv_cache_sized_to_request(model, g, cfg):
    L = cfg.max_seq_len
    req = max(1, min(9, L - 1))
    length = min(L, -(-req // 8) * 8)                       # rounded up to a multiple of 8, capped at L
    model.setup_caches(req)
    kv = model.layers[0].attention.kv_cache
    assert tuple(kv.k_cache.shape) == (1, cfg.n_local_heads, length, cfg.head_dim)
    assert kv.k_cache.dtype == model.dtype
    fkv = model.fast_layers[0].attention.kv_cache
    assert tuple(fkv.k_cache.shape) == (1, cfg.fast_n_local_heads, cfg.num_codebooks, cfg.fast_head_dim)
    if length < L:
        with pytest.raises(ValueError, match="past the KV cache"):
            model.forward_slow(g["input_tokens"][:, :1], torch.tensor([length]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_caches(L + 1)
    P = g["prompt_tokens"].shape[1]
    generate_greedy(model, g["prompt_tokens"], 2)
    assert model.cache_length == min(L, -(-(P + 2) // 8) * 8)


def test_no_quadratic_buffers_or_masks(tdir, g, cfg, monkeypatch):
    model = load_transformer(tdir)
    L = cfg.max_seq_len
    assert list(model.named_buffers()) == []                      # no rope tables, no masks at rest
    model.setup_caches(L)
    for name, buf in model.named_buffers():
        owner = model.get_submodule(name.rpartition(".")[0])
        assert isinstance(owner, KVCache), f"unexpected buffer {name}"
        fast = name.startswith("fast_layers.")
        expected = ((1, cfg.fast_n_local_heads, cfg.num_codebooks, cfg.fast_head_dim) if fast
                    else (1, cfg.n_local_heads, L, cfg.head_dim))
        assert tuple(buf.shape) == expected, name                  # one position axis: no [L, L] anything
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        x = g["input_tokens"]
        T = x.shape[1]
        model.prefill(x[:, : T - 1])
        model.decode_step(x[:, T - 1], T - 1)
        model.forward_slow(x[:, 2:], torch.arange(2, T))
    assert seen
    for tq, tk, mask in seen:
        assert tk <= T, "attention over keys past the positions in use"
        assert mask is None or mask[-2:] == (tq, tk)


def test_bf16_on_cpu_close_to_fp32(tdir, g, model, cfg):
    mb = load_transformer(tdir, dtype=torch.bfloat16)
    assert type(mb) is type(model)
    assert all(p.dtype == torch.bfloat16 for p in mb.parameters())
    with torch.no_grad():
        out = mb.forward_slow(g["input_tokens"])
        assert out.logits.dtype == torch.bfloat16 and out.hidden.dtype == torch.bfloat16
        scale = g["slow_logits"].abs().max().item()
        assert_close(out.logits, g["slow_logits"], "bf16 slow_logits", atol=0.1 * scale, rtol=0.0)
        pos = g["fast_positions"]
        fl = mb.fast_logits_teacher_forced(g["slow_hidden"][pos].bfloat16(), g["fast_teacher_codes"])
        assert fl.dtype == torch.bfloat16
        assert_close(fl, g["fast_logits"], "bf16 fast_logits", atol=0.1 * g["fast_logits"].abs().max().item(),
                     rtol=0.0)
    frames = generate_greedy(mb, g["prompt_tokens"], g["generate_frames"].shape[1])
    assert frames.shape[0] == cfg.num_codebooks + 1 and 1 <= frames.shape[1] <= g["generate_frames"].shape[1]
    assert mb.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# linear swap seam
# ----------------------------------------------------------------------------------------------------

class PlainMatmul(nn.Module):
    """A stand-in for a packed quantized linear: not an nn.Linear, just forward(x) = x @ W^T."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("packed", w.detach().clone())

    def forward(self, x):
        return x @ self.packed.T


@torch.no_grad()
def test_replace_linears_and_build_seam(tdir, g, model, cfg):
    m = load_transformer(tdir)
    done = replace_linears(m, lambda name, lin: PlainMatmul(lin.weight))
    assert set(done) == set(linear_names(model)) and not linear_names(m)
    assert_close(m.forward_slow(g["input_tokens"]).logits, g["slow_logits"], "slow_logits after swap")
    pos = g["fast_positions"]
    assert_close(m.fast_logits_teacher_forced(g["slow_hidden"][pos], g["fast_teacher_codes"]), g["fast_logits"],
                 "fast_logits after swap")
    # the loader seam: one factory turns (name, tensors) into a module
    calls = []

    def factory(name, tensors):
        calls.append(name)
        return PlainMatmul(tensors["weight"])

    from fishlab.manifest import hf_to_internal
    raw = {hf_to_internal(k): v for k, v in load_file(str(tdir / "model.safetensors")).items()}
    built = build_transformer(cfg, raw, factory)
    assert sorted(calls) == sorted(linear_names(model))
    assert_close(built.forward_slow(g["input_tokens"]).logits, g["slow_logits"], "slow_logits via factory")


# ----------------------------------------------------------------------------------------------------
# loading: strictness and layouts
# ----------------------------------------------------------------------------------------------------

def _copy_with(tdir: Path, dst: Path, tensors: dict) -> Path:
    dst.mkdir()
    shutil.copy(tdir / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_strict_loading_errors(tdir, tmp_path):
    orig = load_file(str(tdir / "model.safetensors"))
    names = sorted(orig)
    victim = names[len(names) // 2]

    missing = {k: v for k, v in orig.items() if k != victim}
    with pytest.raises(CheckpointError, match="missing") as e:
        load_transformer(_copy_with(tdir, tmp_path / "missing", missing))
    assert victim in str(e.value) and "missing" in str(e.value)

    extra = dict(orig, **{"text_model.model.bogus.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_transformer(_copy_with(tdir, tmp_path / "extra", extra))
    assert "text_model.model.bogus.weight" in str(e.value)

    bad = dict(orig)
    bad[victim] = torch.zeros(*[s + 1 for s in orig[victim].shape])
    with pytest.raises(CheckpointError, match="shape") as e:
        load_transformer(_copy_with(tdir, tmp_path / "shape", bad))
    assert victim in str(e.value)
    assert issubclass(CheckpointError, ValueError)


@torch.no_grad()
def test_sharded_equals_single_file(tdir, tmp_path, g, model):
    orig = load_file(str(tdir / "model.safetensors"))
    names = sorted(orig)
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tdir / "config.json", d / "config.json")
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({k: orig[k] for k in part}, str(d / fname))
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = load_transformer(d)
    for k, v in model.state_dict().items():
        assert torch.equal(sharded.state_dict()[k], v), k
    x = g["input_tokens"]
    assert torch.equal(sharded.forward_slow(x).logits, model.forward_slow(x).logits)
    # a shard listed in the index but absent is one clear error
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_transformer(d)


# ----------------------------------------------------------------------------------------------------
# CUDA: the same code path on a GPU (skipped where there is none)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@torch.no_grad()
def test_cuda_float32_matches_golden(tdir, g):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = load_transformer(tdir, device="cuda", dtype=torch.float32)
    x = g["input_tokens"].cuda()
    out = m.forward_slow(x)
    assert_close(out.logits, g["slow_logits"], "cuda slow_logits")
    assert_close(out.hidden, g["slow_hidden"], "cuda slow_hidden")
    pos = g["fast_positions"]
    assert_close(m.fast_logits_teacher_forced(g["slow_hidden"][pos].cuda(), g["fast_teacher_codes"].cuda()),
                 g["fast_logits"], "cuda fast_logits")
    frames, trace = generate_greedy(m, g["prompt_tokens"], g["generate_frames"].shape[1], return_trace=True)
    assert torch.equal(frames.cpu(), g["generate_frames"])
    assert_close(trace.stacked()["slow_logits"], g["generate_slow_logits"], "cuda generate_slow_logits")
    mb = load_transformer(tdir, device="cuda", dtype=torch.bfloat16)
    lb = mb.forward_slow(x).logits
    assert_close(lb, g["slow_logits"], "cuda bf16 slow_logits", atol=0.1 * g["slow_logits"].abs().max().item(),
                 rtol=0.0)
