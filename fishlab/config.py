"""Configs of S2 Pro as plain dataclasses, parsed from the real file formats.

- `DualARConfig`: the text-to-semantic transformer, read from the HF `config.json` (model_type
  `fish_qwen3_omni`, with `text_config` for the slow AR and `audio_decoder_config` for the fast AR), flattened
  exactly as the reference does (spec s2pro-model.md §2.1).
- `CodecConfig`: the modded-DAC codec. The real checkpoint ships no codec config, so the defaults are S2 Pro's;
  `codec_config.json` in the self-describing schema of the golden sets (and of fishlab's demo checkpoint) is
  read and written too.
- `TextLMConfig`: a plain decoder-only text LM made of the same blocks (fishlab's own `fishlab_text_lm`
  config.json; the trained proxy model of `fishlab.trained` is one). `SlowARFields` are what both share.
- `ModelConfig`: a transformer config and its codec (None for a text LM), plus a name. `preset("s2-pro")` and
  `preset("demo")` build them without any file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


from . import spec


class ConfigError(ValueError):
    """A config file or preset that fishlab cannot use; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------------
# DualAR transformer
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlowARFields:
    """The decoder-only transformer both model families share: S2 Pro's slow AR (Qwen3-shaped, QK-norm) and a
    plain text LM of the same family (llama-shaped, e.g. the trained proxy model of `fishlab.trained`)."""
    vocab_size: int
    n_layer: int
    dim: int
    n_head: int
    n_local_heads: int
    head_dim: int
    intermediate_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    attention_qk_norm: bool
    tie_word_embeddings: bool

    # --- derived sizes (spec §2.2) ---
    @property
    def q_width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_local_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return self.q_width + 2 * self.kv_width

    def _validate_slow(self, need) -> None:
        for f in ("vocab_size", "n_layer", "dim", "n_head", "n_local_heads", "head_dim", "intermediate_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f"{f} must be a positive integer, got {v!r}")
        need(self.n_head % self.n_local_heads == 0,
             f"n_head ({self.n_head}) must be a multiple of n_local_heads ({self.n_local_heads})")
        need(self.head_dim % 2 == 0, "head_dim must be even (RoPE pairs)")
        need(self.tie_word_embeddings, "only tied heads (tie_word_embeddings=true) are supported, as in S2 Pro")


@dataclass(frozen=True)
class DualARConfig(SlowARFields):
    # slow AR (text_config): the SlowARFields
    # fast AR (audio_decoder_config)
    codebook_size: int
    num_codebooks: int
    fast_n_layer: int
    fast_dim: int
    fast_n_head: int
    fast_n_local_heads: int
    fast_head_dim: int
    fast_intermediate_size: int
    fast_attention_qk_norm: bool
    audio_embed_dim: int
    # special tokens (top level)
    eos_token_id: int
    pad_token_id: int
    audio_pad_token_id: int
    semantic_begin_id: int
    semantic_end_id: int
    dtype: str = "bfloat16"
    # the parsed file, kept so a quantized copy can write it back unchanged
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # --- derived sizes (spec §2.2) ---
    @property
    def fast_q_width(self) -> int:
        return self.fast_n_head * self.fast_head_dim

    @property
    def fast_kv_width(self) -> int:
        return self.fast_n_local_heads * self.fast_head_dim

    @property
    def fast_qkv_rows(self) -> int:
        return self.fast_q_width + 2 * self.fast_kv_width

    @property
    def has_fast_project_in(self) -> bool:
        return self.fast_dim != self.dim

    @property
    def n_semantic(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    def validate(self, source: str = "config") -> "DualARConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        self._validate_slow(need)
        for f in ("codebook_size", "num_codebooks", "fast_n_layer", "fast_dim", "fast_n_head",
                  "fast_n_local_heads", "fast_head_dim", "fast_intermediate_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f"{f} must be a positive integer, got {v!r}")
        need(self.fast_n_head % self.fast_n_local_heads == 0,
             f"fast n_head ({self.fast_n_head}) must be a multiple of n_local_heads ({self.fast_n_local_heads})")
        need(self.fast_head_dim % 2 == 0, "fast head_dim must be even (RoPE pairs)")
        need(0 <= self.semantic_begin_id <= self.semantic_end_id < self.vocab_size,
             f"semantic ids {self.semantic_begin_id}..{self.semantic_end_id} must lie inside vocab_size "
             f"{self.vocab_size}")
        need(self.n_semantic <= self.codebook_size,
             f"{self.n_semantic} semantic tokens but codebook_size is only {self.codebook_size}")
        need(0 <= self.eos_token_id < self.vocab_size, f"eos_token_id {self.eos_token_id} outside vocab")
        need(self.dtype in ("bfloat16", "float16", "float32"), f"dtype {self.dtype!r} is not a float dtype")
        return self

    # --- the HF file format ---
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "DualARConfig":
        if d.get("model_type") != spec.MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected {spec.MODEL_TYPE!r}")
        for key in ("text_config", "audio_decoder_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"{source}: missing the {key!r} section")
        t, a = d["text_config"], d["audio_decoder_config"]
        for flag in ("attention_qkv_bias", "attention_o_bias"):
            if t.get(flag) or a.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported (S2 Pro has no attention biases)")
        for key in ("semantic_start_token_id", "semantic_end_token_id", "eos_token_id"):
            if key not in d:
                raise ConfigError(f"{source}: missing top-level {key!r}")

        def req(section: dict, name: str, key: str):
            if section.get(key) is None:
                raise ConfigError(f"{source}: {name}.{key} is missing")
            return section[key]

        dim = int(req(t, "text_config", "dim"))
        n_head = int(req(t, "text_config", "n_head"))
        # Fallbacks of the reference (spec §2.1): head_dim -> 64 (not dim/n_head), ffn -> 8/3*dim rounded to 256.
        inter_default = int(math.ceil(int(8 * dim / 3) / 256) * 256)
        slow = dict(
            vocab_size=int(req(t, "text_config", "vocab_size")),
            n_layer=int(req(t, "text_config", "n_layer")),
            dim=dim,
            n_head=n_head,
            n_local_heads=int(t.get("n_local_heads") or n_head),
            head_dim=int(t.get("head_dim") or 64),
            intermediate_size=int(t.get("intermediate_size") or inter_default),
            rope_base=float(t.get("rope_base") or 10000.0),
            norm_eps=float(t.get("norm_eps") or 1e-5),
            max_seq_len=int(t.get("max_seq_len") or 2048),
            attention_qk_norm=bool(t.get("attention_qk_norm", False)),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", True)),
        )

        def fast(key: str, slow_key: str):  # a missing/null fast field inherits the slow value
            v = a.get(key)
            return slow[slow_key] if v is None else v

        cfg = cls(
            **slow,
            codebook_size=int(req(a, "audio_decoder_config", "vocab_size")),
            num_codebooks=int(req(a, "audio_decoder_config", "num_codebooks")),
            fast_n_layer=int(fast("n_layer", "n_layer")),
            fast_dim=int(fast("dim", "dim")),
            fast_n_head=int(fast("n_head", "n_head")),
            fast_n_local_heads=int(fast("n_local_heads", "n_local_heads")),
            fast_head_dim=int(fast("head_dim", "head_dim")),
            fast_intermediate_size=int(fast("intermediate_size", "intermediate_size")),
            fast_attention_qk_norm=bool(a.get("attention_qk_norm", False)),
            audio_embed_dim=int(a.get("text_dim") or slow["dim"]),
            eos_token_id=int(d["eos_token_id"]),
            pad_token_id=int(d.get("pad_token_id", d["eos_token_id"])),
            audio_pad_token_id=int(d.get("audio_pad_token_id", d["eos_token_id"])),
            semantic_begin_id=int(d["semantic_start_token_id"]),
            semantic_end_id=int(d["semantic_end_token_id"]),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            raw=copy.deepcopy(d),
        )
        if cfg.fast_attention_qk_norm:
            raise ConfigError(f"{source}: audio_decoder_config.attention_qk_norm=true is not supported")
        return cfg.validate(source)

    def to_hf_dict(self) -> dict:
        """The config.json this config came from (or, for a preset, the one the real file would hold)."""
        if self.raw:
            return copy.deepcopy(self.raw)
        common = dict(dropout=0.0, attention_qkv_bias=False, attention_o_bias=False,
                      rope_base=self.rope_base, norm_eps=self.norm_eps,
                      initializer_range=self.dim ** -0.5, use_gradient_checkpointing=True,
                      audio_hidden_dim=2 * self.dim, use_moe=False)
        return {
            "model_type": spec.MODEL_TYPE,
            "dtype": self.dtype,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "audio_pad_token_id": self.audio_pad_token_id,
            "semantic_start_token_id": self.semantic_begin_id,
            "semantic_end_token_id": self.semantic_end_id,
            "text_config": dict(common, model_type=spec.TEXT_MODEL_TYPE, vocab_size=self.vocab_size,
                                n_layer=self.n_layer, dim=self.dim, n_head=self.n_head,
                                n_local_heads=self.n_local_heads, head_dim=self.head_dim,
                                intermediate_size=self.intermediate_size, max_seq_len=self.max_seq_len,
                                attention_qk_norm=self.attention_qk_norm,
                                tie_word_embeddings=self.tie_word_embeddings),
            "audio_decoder_config": dict(common, model_type=spec.AUDIO_DECODER_MODEL_TYPE,
                                         vocab_size=self.codebook_size, num_codebooks=self.num_codebooks,
                                         n_layer=self.fast_n_layer, dim=self.fast_dim, n_head=self.fast_n_head,
                                         n_local_heads=self.fast_n_local_heads, head_dim=self.fast_head_dim,
                                         intermediate_size=self.fast_intermediate_size,
                                         text_dim=self.audio_embed_dim, max_seq_len=self.num_codebooks + 1,
                                         attention_qk_norm=False, tie_word_embeddings=False),
        }


# ----------------------------------------------------------------------------------------------------
# A plain text LM of the same family (the trained proxy model)
# ----------------------------------------------------------------------------------------------------

ROPE_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class TextLMConfig(SlowARFields):
    """A decoder-only text LM with S2 Pro's slow-AR blocks (fishlab's own config.json, model_type
    `fishlab_text_lm`): the same `text_config` keys as S2 Pro, no audio decoder, no codec.

    rope_dtype: the dtype the RoPE cos/sin table is rounded to. S2 Pro rounds it to bfloat16 (spec §5.4);
    llama-family runtimes (llama.cpp, HF) keep it in float32, which is what a converted llama model expects.
    """
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool = False
    architecture: str = "llama"
    rope_dtype: str = "float32"
    dtype: str = "float32"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def validate(self, source: str = "config") -> "TextLMConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        self._validate_slow(need)
        need(self.rope_dtype in ROPE_DTYPES, f"rope_dtype must be one of {ROPE_DTYPES}, got {self.rope_dtype!r}")
        need(self.dtype in ("bfloat16", "float16", "float32"), f"dtype {self.dtype!r} is not a float dtype")
        for k in ("bos_token_id", "eos_token_id"):
            v = getattr(self, k)
            need(v is None or 0 <= v < self.vocab_size, f"{k} {v} outside the vocabulary of {self.vocab_size}")
        return self

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "TextLMConfig":
        if d.get("model_type") != spec.TEXT_LM_MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected {spec.TEXT_LM_MODEL_TYPE!r}")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ConfigError(f"{source}: missing the 'text_config' section")
        try:
            cfg = cls(
                vocab_size=int(t["vocab_size"]), n_layer=int(t["n_layer"]), dim=int(t["dim"]),
                n_head=int(t["n_head"]), n_local_heads=int(t["n_local_heads"]), head_dim=int(t["head_dim"]),
                intermediate_size=int(t["intermediate_size"]), rope_base=float(t["rope_base"]),
                norm_eps=float(t["norm_eps"]), max_seq_len=int(t["max_seq_len"]),
                attention_qk_norm=bool(t.get("attention_qk_norm", False)),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", True)),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                add_bos_token=bool(d.get("add_bos_token", False)), architecture=str(d.get("architecture", "llama")),
                rope_dtype=str(t.get("rope_dtype", "float32")), dtype=str(d.get("dtype", "float32")),
                raw=copy.deepcopy(d))
        except KeyError as e:
            raise ConfigError(f"{source}: text_config.{e.args[0]} is missing") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: malformed text_config ({e})") from None
        return cfg.validate(source)

    def to_hf_dict(self) -> dict:
        if self.raw:
            return copy.deepcopy(self.raw)
        return {
            "model_type": spec.TEXT_LM_MODEL_TYPE, "architecture": self.architecture, "dtype": self.dtype,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "add_bos_token": self.add_bos_token,
            "text_config": dict(vocab_size=self.vocab_size, n_layer=self.n_layer, dim=self.dim, n_head=self.n_head,
                                n_local_heads=self.n_local_heads, head_dim=self.head_dim,
                                intermediate_size=self.intermediate_size, rope_base=self.rope_base,
                                norm_eps=self.norm_eps, max_seq_len=self.max_seq_len,
                                attention_qk_norm=self.attention_qk_norm,
                                tie_word_embeddings=self.tie_word_embeddings, rope_dtype=self.rope_dtype),
        }


# ----------------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodecTransformerConfig:
    """One WindowLimitedTransformer of the codec (encoder stage, quantizer pre/post module)."""
    n_layer: int
    dim: int
    n_head: int
    head_dim: int
    intermediate_size: int
    window: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple = (2, 4, 8, 8)
    encoder_transformer_layers: tuple = (0, 0, 0, 4)
    encoder_transformer_head_dim: int = 64   # n_head = stage_dim // 64 and ffn = 3*dim are hard-coded
    encoder_transformer_window: int = 512    # fixed in the reference
    latent_dim: int = 1024
    decoder_dim: int = 1536
    decoder_rates: tuple = (8, 8, 4, 2)
    downsample_factors: tuple = (2, 2)
    quantizer_transformer: CodecTransformerConfig = CodecTransformerConfig(
        n_layer=8, dim=1024, n_head=16, head_dim=64, intermediate_size=3072, window=128)
    semantic_codebook_size: int = 4096
    n_residual_codebooks: int = 9
    residual_codebook_size: int = 1024
    codebook_dim: int = 8
    convnext_mlp_ratio: int = 4
    convnext_kernel: int = 7
    transformer_rope_base: float = 10000.0
    transformer_norm_eps: float = 1e-5

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        return self.hop_length * math.prod(self.downsample_factors)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.frame_length

    @property
    def n_codebooks(self) -> int:
        return 1 + self.n_residual_codebooks

    @property
    def encoder_stage_dims(self) -> tuple:
        return tuple(self.encoder_dim * 2 ** (i + 1) for i in range(len(self.encoder_rates)))

    @property
    def decoder_stage_dims(self) -> tuple:
        return tuple(self.decoder_dim // 2 ** i for i in range(len(self.decoder_rates) + 1))

    def encoder_transformer(self, stage: int) -> CodecTransformerConfig | None:
        n = self.encoder_transformer_layers[stage]
        if not n:
            return None
        d = self.encoder_stage_dims[stage]
        return CodecTransformerConfig(n_layer=n, dim=d, n_head=max(1, d // 64),
                                      head_dim=self.encoder_transformer_head_dim, intermediate_size=3 * d,
                                      window=self.encoder_transformer_window,
                                      rope_base=self.transformer_rope_base, norm_eps=self.transformer_norm_eps)

    def validate(self, source: str = "codec config") -> "CodecConfig":
        if len(self.encoder_transformer_layers) != len(self.encoder_rates):
            raise ConfigError(f"{source}: encoder_transformer_layers has {len(self.encoder_transformer_layers)} "
                              f"entries for {len(self.encoder_rates)} encoder stages")
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ConfigError(f"{source}: decoder_dim {self.decoder_dim} is not divisible by "
                              f"2^{len(self.decoder_rates)}")
        if self.quantizer_transformer.dim != self.latent_dim:
            raise ConfigError(f"{source}: pre/post module dim {self.quantizer_transformer.dim} != latent_dim "
                              f"{self.latent_dim}")
        return self

    # --- the self-describing codec_config.json schema (golden sets, demo checkpoint) ---
    @classmethod
    def from_json_dict(cls, d: dict, source: str = "codec_config.json") -> "CodecConfig":
        try:
            enc, q, dec = d["encoder"], d["quantizer"], d["decoder"]
            tr = enc.get("transformers") or []
            pre = q["pre_module"]
            post = q.get("post_module", pre)
            qt = CodecTransformerConfig(
                n_layer=int(pre["n_layer"]), dim=int(pre["dim"]), n_head=int(pre["n_head"]),
                head_dim=int(pre["head_dim"]), intermediate_size=int(pre["intermediate_size"]),
                window=int(pre["window_size"]), rope_base=float(pre.get("rope_base", 10000.0)),
                norm_eps=float(pre.get("norm_eps", 1e-5)))
            if {k: post.get(k) for k in pre} != pre:
                raise ConfigError(f"{source}: pre_module and post_module differ; fishlab assumes identical shapes")
            cfg = cls(
                sample_rate=int(d["sample_rate"]),
                encoder_dim=int(enc["base_dim"]),
                encoder_rates=tuple(int(r) for r in enc["rates"]),
                encoder_transformer_layers=tuple(int(n) for n in enc["transformer_layers_per_stage"]),
                encoder_transformer_head_dim=int(tr[0]["head_dim"]) if tr else 64,
                encoder_transformer_window=int(tr[0]["window_size"]) if tr else 512,
                latent_dim=int(d["latent_dim"]),
                decoder_dim=int(dec["base_dim"]),
                decoder_rates=tuple(int(r) for r in dec["rates"]),
                downsample_factors=tuple(int(f) for f in q["downsample_factors"]),
                quantizer_transformer=qt,
                semantic_codebook_size=int(q["semantic_codebook"]["codebook_size"]),
                n_residual_codebooks=int(q["residual_codebooks"]["n_codebooks"]),
                residual_codebook_size=int(q["residual_codebooks"]["codebook_size"]),
                codebook_dim=int(q["residual_codebooks"]["codebook_dim"]),
                convnext_mlp_ratio=int(q.get("convnext", {}).get("mlp_ratio", 4)),
                convnext_kernel=int(q.get("convnext", {}).get("dwconv_kernel", 7)),
                transformer_rope_base=float(tr[0].get("rope_base", 10000.0)) if tr else 10000.0,
                transformer_norm_eps=float(tr[0].get("norm_eps", 1e-5)) if tr else 1e-5,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, IndexError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: malformed codec config ({e})") from None
        return cfg.validate(source)

    def to_json_dict(self) -> dict:
        def tdict(t: CodecTransformerConfig) -> dict:
            return dict(n_layer=t.n_layer, dim=t.dim, n_head=t.n_head, n_kv_head=t.n_head, head_dim=t.head_dim,
                        intermediate_size=t.intermediate_size, window_size=t.window, rope_base=t.rope_base,
                        norm_eps=t.norm_eps)
        enc_tr = [dict(tdict(t), stage=i) for i in range(len(self.encoder_rates))
                  if (t := self.encoder_transformer(i)) is not None]
        return {
            "format": "fish-s2-codec-golden-config/1",
            "architecture": "Fish Audio modded DAC (causal conv encoder/decoder + DownsampleResidualVectorQuantize)",
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "frame_length": self.frame_length,
            "frames_per_second": self.frames_per_second,
            "latent_dim": self.latent_dim,
            "encoder": {"base_dim": self.encoder_dim, "rates": list(self.encoder_rates),
                        "stage_out_dims": list(self.encoder_stage_dims),
                        "transformer_layers_per_stage": list(self.encoder_transformer_layers),
                        "transformers": enc_tr},
            "quantizer": {
                "input_dim": self.latent_dim,
                "downsample_factors": list(self.downsample_factors),
                "convnext": {"dwconv_kernel": self.convnext_kernel, "mlp_ratio": self.convnext_mlp_ratio},
                "pre_module": tdict(self.quantizer_transformer),
                "post_module": tdict(self.quantizer_transformer),
                "semantic_codebook": {"n_codebooks": 1, "codebook_size": self.semantic_codebook_size,
                                      "codebook_dim": self.codebook_dim},
                "residual_codebooks": {"n_codebooks": self.n_residual_codebooks,
                                       "codebook_size": self.residual_codebook_size,
                                       "codebook_dim": self.codebook_dim},
            },
            "decoder": {"base_dim": self.decoder_dim, "rates": list(self.decoder_rates),
                        "stage_dims": list(self.decoder_stage_dims)},
        }


# ----------------------------------------------------------------------------------------------------
# Both, and presets
# ----------------------------------------------------------------------------------------------------

CODEC_CONFIG_FILE = "codec_config.json"


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's configs: S2 Pro's DualAR + codec, or a text LM (codec None)."""
    name: str
    transformer: DualARConfig | TextLMConfig
    codec: CodecConfig | None

    def summary(self) -> dict:
        """A flat, JSON-friendly description for reports."""
        t, c = self.transformer, self.codec
        out = {"name": self.name}
        out.update({k: v for k, v in dataclasses.asdict(t).items() if k != "raw"})
        if c is not None:
            out.update({"codec_" + k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(c).items() if not isinstance(v, dict)})
            out["codec_frame_length"] = c.frame_length
            out["codec_frames_per_second"] = c.frames_per_second
        return out


def _s2pro_hf_dict() -> dict:
    common = dict(dim=2560, n_head=32, n_local_heads=8, head_dim=128, intermediate_size=9728, rope_base=1000000,
                  norm_eps=1e-6, dropout=0.0, attention_qkv_bias=False, attention_o_bias=False,
                  initializer_range=2560 ** -0.5, use_gradient_checkpointing=True, audio_hidden_dim=5120,
                  use_moe=False)
    return {
        "model_type": spec.MODEL_TYPE, "dtype": "bfloat16",
        "eos_token_id": 151645, "pad_token_id": 151669, "audio_pad_token_id": 151677,
        "semantic_start_token_id": 151678, "semantic_end_token_id": 155773,
        "text_config": dict(common, model_type=spec.TEXT_MODEL_TYPE, vocab_size=155776, n_layer=36,
                            max_seq_len=32768, attention_qk_norm=True, tie_word_embeddings=True),
        "audio_decoder_config": dict(common, model_type=spec.AUDIO_DECODER_MODEL_TYPE, vocab_size=4096,
                                     num_codebooks=10, n_layer=4, text_dim=2560, max_seq_len=11,
                                     attention_qk_norm=False, tie_word_embeddings=False),
    }


# The demo model: S2 Pro's structure (names, 10 codebooks, QK-norm, GQA 4:1, tied head, the real special-token
# order) at a width where the whole workbook runs on 2 CPU cores. Token ids are laid out like the real vocab:
# text ids, then <|endoftext|>.. specials, then the semantic block; see fishlab.demo for the tokenizer.
DEMO_TEXT_VOCAB = 512          # byte-level BPE base vocabulary of the demo tokenizer
DEMO_N_SEMANTIC = 256


def _demo_hf_dict() -> dict:
    base = DEMO_TEXT_VOCAB
    eos, pad, audio_pad, sem0 = base + 2, base + 26, base + 34, base + 35   # same offsets as 151643 + k
    sem_end = sem0 + DEMO_N_SEMANTIC - 1
    vocab = (sem_end + 1 + 2 + 63) // 64 * 64   # two unused rows like the real table, padded to 64
    common = dict(dim=256, n_head=8, n_local_heads=2, head_dim=64, intermediate_size=768, rope_base=1000000,
                  norm_eps=1e-6, dropout=0.0, attention_qkv_bias=False, attention_o_bias=False,
                  initializer_range=256 ** -0.5, use_gradient_checkpointing=True, audio_hidden_dim=512,
                  use_moe=False)
    return {
        "model_type": spec.MODEL_TYPE, "dtype": "bfloat16",
        "eos_token_id": eos, "pad_token_id": pad, "audio_pad_token_id": audio_pad,
        "semantic_start_token_id": sem0, "semantic_end_token_id": sem_end,
        "text_config": dict(common, model_type=spec.TEXT_MODEL_TYPE, vocab_size=vocab, n_layer=4,
                            max_seq_len=4096, attention_qk_norm=True, tie_word_embeddings=True),
        "audio_decoder_config": dict(common, model_type=spec.AUDIO_DECODER_MODEL_TYPE, vocab_size=DEMO_N_SEMANTIC,
                                     num_codebooks=10, n_layer=2, text_dim=256, max_seq_len=11,
                                     attention_qk_norm=False, tie_word_embeddings=False),
    }


DEMO_CODEC = CodecConfig(
    encoder_dim=8, encoder_rates=(2, 4, 8, 8), encoder_transformer_layers=(0, 0, 0, 1),
    encoder_transformer_head_dim=64, latent_dim=128, decoder_dim=96, decoder_rates=(8, 8, 4, 2),
    quantizer_transformer=CodecTransformerConfig(n_layer=1, dim=128, n_head=2, head_dim=64, intermediate_size=384,
                                                 window=16),
    semantic_codebook_size=DEMO_N_SEMANTIC, n_residual_codebooks=9, residual_codebook_size=128, codebook_dim=8)

PRESETS = {
    "s2-pro": lambda: ModelConfig("s2-pro", DualARConfig.from_hf_dict(_s2pro_hf_dict(), "preset s2-pro"),
                                  CodecConfig().validate("preset s2-pro")),
    "demo": lambda: ModelConfig("demo", DualARConfig.from_hf_dict(_demo_hf_dict(), "preset demo"),
                                DEMO_CODEC.validate("preset demo")),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_transformer_config(path: str | Path) -> DualARConfig | TextLMConfig:
    """Read a `config.json` (or the directory holding it): S2 Pro's (`fish_qwen3_omni`) or a fishlab text LM's
    (`fishlab_text_lm`)."""
    p = Path(path)
    if p.is_dir():
        p = p / spec.CONFIG_FILE
    d = _read_json(p)
    if isinstance(d, dict) and d.get("model_type") == spec.TEXT_LM_MODEL_TYPE:
        return TextLMConfig.from_hf_dict(d, str(p))
    return DualARConfig.from_hf_dict(d, str(p))


def load_codec_config(path: str | Path | None) -> CodecConfig:
    """Read `codec_config.json` (or a directory holding `codec_config.json`/`config.json` in that schema);
    None or a directory without one gives S2 Pro's codec (the real checkpoint ships no codec config)."""
    if path is None:
        return CodecConfig()
    p = Path(path)
    if p.is_dir():
        for name in (CODEC_CONFIG_FILE, spec.CONFIG_FILE):
            cand = p / name
            if cand.exists():
                d = _read_json(cand)
                if "encoder" in d and "quantizer" in d:
                    return CodecConfig.from_json_dict(d, str(cand))
        return CodecConfig()
    return CodecConfig.from_json_dict(_read_json(p), str(p))


def load_config(source: str | Path) -> ModelConfig:
    """A preset name, or a checkpoint directory (config.json + optional codec_config.json)."""
    if isinstance(source, str) and source in PRESETS:
        return preset(source)
    p = Path(source)
    if not p.exists():
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path")
    d = p if p.is_dir() else p.parent
    t = load_transformer_config(p)
    return ModelConfig(d.name, t, None if isinstance(t, TextLMConfig) else load_codec_config(d))
