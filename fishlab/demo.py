"""The synthetic demo checkpoint: S2 Pro's exact file layout at a size that runs on 2 CPU cores.

`build_demo_checkpoint(dir)` writes, deterministically:
- `config.json` in the real fish_qwen3_omni format (preset "demo" of fishlab.config);
- `model-00001-of-00002.safetensors`, `model-00002-of-00002.safetensors` + `model.safetensors.index.json`
  with the real HF tensor names, bfloat16;
- `codec.pth`: a torch pickle of a plain state dict (float32), plus `codec_config.json` (the real checkpoint
  ships no codec config; the demo codec is smaller than S2 Pro's, so it says its shape);
- `tokenizer.json`: a small byte-level BPE whose added tokens sit at the real S2 Pro offsets
  (<|endoftext|> first, <|im_start|>, <|im_end|>, ..., <|voice|>, ..., <|semantic:0..N-1|>).

The weights are synthetic, but not Gaussian noise: linear weights are Student-t (heavy tails) with a
log-normal per-row scale and a few outlier input channels, the structure that makes real LLM weights hard to
quantize, so error figures have the shape real weights give. Reports built on it say so.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import torch

from . import spec
from .checkpoint import OutTensor, write_sharded
from .config import CODEC_CONFIG_FILE, ModelConfig, preset
from .io import atomic_dir, write_json_atomic
from .manifest import TensorSpec, codec_manifest, transformer_manifest
from .model.codec_load import write_codec_pth

DEMO_VERSION = 1
DEMO_MARKER = "fishlab_demo.json"   # its presence marks a synthetic checkpoint
SYNTHETIC_NOTE = ("These weights are SYNTHETIC (fishlab's demo checkpoint): heavy-tailed random weights in S2 Pro's "
                  "layout. Sizes, formats and error shapes are meaningful; the audio is noise.")


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _student_t(g: torch.Generator, shape: tuple, df: float = 4.0) -> torch.Tensor:
    """Student-t samples with unit variance, from normals and a chi-square built from normals."""
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((int(df),) + tuple(shape), generator=g).pow(2).sum(0)
    return z / torch.sqrt(chi2 / df) / math.sqrt(df / (df - 2))


def synthetic_linear(g: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Heavy-tailed weight [rows, cols]: t(4) entries x log-normal row scale x a few outlier input columns."""
    w = _student_t(g, (rows, cols)) * cols ** -0.5
    w *= torch.exp(0.35 * torch.randn(rows, 1, generator=g))
    n_out = max(1, cols // 128)
    idx = torch.randperm(cols, generator=g)[:n_out]
    w[:, idx] *= 4.0 + 8.0 * torch.rand(n_out, generator=g)
    return w


def transformer_tensor(s: TensorSpec, seed: int) -> torch.Tensor:
    g = _gen(seed, s.name)
    if s.kind == "linear":
        w = synthetic_linear(g, *s.shape)
    elif s.kind == "embedding":
        w = _student_t(g, s.shape) * s.shape[1] ** -0.5
    else:  # norms
        w = 1.0 + 0.1 * torch.randn(s.shape, generator=g)
    return w.to(torch.bfloat16)


def codec_tensor(s: TensorSpec, seed: int) -> torch.Tensor:
    """Initialisation in the spirit of golden A's codec (so encode/decode give finite, bounded audio)."""
    g = _gen(seed, s.name)
    n, shape = s.name, s.shape
    if n.endswith(".alpha"):
        return torch.exp(0.25 * torch.randn(shape, generator=g))
    if n.endswith("original0") or n.endswith("weight_g"):
        lo, hi = (0.1, 0.3) if (".block.3.conv" in n and "encoder.block.0" not in n) else (0.7, 1.3)
        return lo + (hi - lo) * torch.rand(shape, generator=g)
    if n.endswith("original1") or n.endswith("weight_v"):
        return 0.02 * torch.randn(shape, generator=g)
    if n.endswith(".gamma"):
        return 0.05 + 0.25 * torch.rand(shape, generator=g)
    if n.endswith("codebook.weight"):
        return torch.randn(shape, generator=g)
    if s.kind == "norm":
        return (1.0 + 0.1 * torch.randn(shape, generator=g)) if n.endswith("weight") else 0.01 * torch.randn(shape, generator=g)
    if n.endswith(".bias"):
        return 0.01 * torch.randn(shape, generator=g)
    if len(shape) == 3:  # plain conv [out, in/groups, k] or transposed [in, out, k]
        fan = shape[0] if ".upsample." in n else shape[1] * shape[2]
        return torch.randn(shape, generator=g) * fan ** -0.5
    return torch.randn(shape, generator=g) * shape[-1] ** -0.5


def synthetic_codec(codec_cfg, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A `Codec` of any config (e.g. S2 Pro's, 391M parameters) with the demo's synthetic weights, built in memory
    (no file): for memory and speed measurements where no real codec is at hand."""
    from .model.codec_load import _meta_codec, check_codec_state_dict
    sd = {s.name: codec_tensor(s, seed).to(device=device, dtype=dtype) for s in codec_manifest(codec_cfg)}
    model = _meta_codec(codec_cfg)
    model.load_state_dict(check_codec_state_dict(sd, codec_cfg, "synthetic codec"), strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------

# Added tokens from <|endoftext|> (id base+0) to <|audio_pad|> (base+34), in the real order (spec §9.1; the
# Qwen3 block between <|im_end|> and <|pad|> is reproduced so every fish-speech id keeps its offset).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>", "<|voice|>",
    "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
]

_CORPUS = [
    spec.NARRATION,
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Hello there, this is me. Good morning! How are you today? I am fine, thank you.",
    "Quantization trades a little accuracy for a lot of memory: eight bits, four bits, three bits, two bits.",
    "Speech synthesis turns text into sound; a codec turns sound into codes and back again.",
    "One, two, three, four, five, six, seven, eight, nine, ten. Numbers and words and sentences.",
    "She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.",
    "convert the provided text to speech reference to the following: Text: Speech: system user assistant",
]


def build_tokenizer(cfg: ModelConfig):
    """A byte-level BPE with exactly DEMO_TEXT_VOCAB base tokens and the special tokens at the real offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = cfg.transformer
    base = t.eos_token_id - SPECIAL_TOKENS.index("<|im_end|>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    n = tok.get_vocab_size()
    if n > base:
        raise RuntimeError(f"demo tokenizer has {n} base tokens, more than the {base} reserved")
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(n, base):                       # fill the base range so added ids land on the real offsets
        vocab[f"<|reserved_{i}|>"] = i
    added = SPECIAL_TOKENS + [f"<|semantic:{k}|>" for k in range(t.n_semantic)]
    data["added_tokens"] = [{"id": base + i, "content": s, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for i, s in enumerate(added)]
    result = Tokenizer.from_str(json.dumps(data))
    assert result.token_to_id("<|im_end|>") == t.eos_token_id
    assert result.token_to_id("<|semantic:0|>") == t.semantic_begin_id
    assert result.token_to_id("<|pad|>") == t.pad_token_id and result.token_to_id("<|audio_pad|>") == t.audio_pad_token_id
    return result


# ----------------------------------------------------------------------------------------------------
# the checkpoint
# ----------------------------------------------------------------------------------------------------

def build_demo_checkpoint(out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                          cfg: ModelConfig | None = None) -> Path:
    """Write the demo checkpoint to out_dir (atomically: the directory appears complete or not at all)."""
    cfg = cfg or preset("demo")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / spec.CONFIG_FILE, cfg.transformer.to_hf_dict())
        specs = transformer_manifest(cfg.transformer)
        tensors = [OutTensor(s.name, s.shape, s.dtype, (lambda s=s: transformer_tensor(s, seed))) for s in specs]
        write_sharded(tmp, tensors, n_shards=2, metadata={"format": "pt", "fishlab_demo": f"v{DEMO_VERSION}",
                                                          "seed": str(seed)})
        write_codec_pth({s.name: codec_tensor(s, seed) for s in codec_manifest(cfg.codec)}, tmp / spec.CODEC_FILE)
        write_json_atomic(tmp / CODEC_CONFIG_FILE, cfg.codec.to_json_dict())
        build_tokenizer(cfg).save(str(tmp / spec.TOKENIZER_FILE))
        write_json_atomic(tmp / DEMO_MARKER, {"version": DEMO_VERSION, "seed": seed, "synthetic": True,
                                                      "note": SYNTHETIC_NOTE})
    return out_dir


def cache_dir() -> Path:
    return Path(os.environ.get("FISHLAB_CACHE") or Path.home() / ".cache" / "fishlab")


def demo_checkpoint(seed: int = 0) -> Path:
    """The demo checkpoint in fishlab's cache, built on first use (safe if two processes race)."""
    d = cache_dir() / f"demo-v{DEMO_VERSION}-seed{seed}"
    if not (d / DEMO_MARKER).exists():
        try:
            build_demo_checkpoint(d, seed=seed)
        except FileExistsError:
            pass
    return d


def is_synthetic(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / DEMO_MARKER).exists()


def checkpoint_digest(ckpt_dir: str | Path) -> str:
    """sha256 over every file's name and bytes (for 'the input is never modified' checks)."""
    h = hashlib.sha256()
    for p in sorted(Path(ckpt_dir).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(ckpt_dir)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
