"""The single-file GGUF layout s2.cpp loads (../shared/spec/gguf-s2cpp.md), as pure mappings: tensor names,
weight-norm folding of the codec, header keys, and the ggml type each tensor gets.

The writer (`fishlab.export.gguf`) and the reader (`fishlab.sources.gguf`) both use it, so a name or a key is
spelled once. Nothing here touches files.

- names: the transformer keeps its internal (fish-speech) name, i.e. `manifest.hf_to_internal`
  (`text_model.model.` dropped, `audio_decoder.X` -> `fast_X`, `codebook_embeddings.weight` kept);
  codec tensors are `c.` + their codec.pth name, with each weight-normed pair folded into one `X.weight`.
- types: norms (1-D) stay F32; a 2-D transformer tensor gets the asked type when its rows are whole blocks
  of that type (else F16, and the writer says so); codec weights (2-D and up) are F16 (s2.cpp's
  convolutions need F16: an F32 codec aborts in im2col), every other codec tensor (biases, Snake alphas,
  layer-scale gammas, norm weights) F32.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V, LlamaFileType

from . import spec
from .config import CodecConfig, DualARConfig, ModelConfig
from .manifest import TensorSpec, codec_manifest, hf_to_internal, linear_targets, transformer_manifest

# --type names -> ggml types: floats as cast; the quantized ones gguf-py's numpy quantizer writes bit-exactly
# like ggml's reference (K-quants are not offered: fishlab has no packer proven against gguf-py's dequantizer)
TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16,
         "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
              T.Q5_1: LlamaFileType.MOSTLY_Q5_1}


class NoGGUFEquivalent(ValueError):
    """A fishlab phase whose scheme has no GGUF type fishlab can write; the message says why and what's near."""


# ----------------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------------

def transformer_name(hf_name: str) -> str:
    return hf_to_internal(hf_name)


_WN_PAIRS = ((".parametrizations.weight.original0", ".parametrizations.weight.original1"),
             (".weight_g", ".weight_v"))


@dataclass(frozen=True)
class CodecTensor:
    """One codec tensor of the GGUF: its name there and the codec.pth tensors it comes from (g, v for a
    folded weight-norm pair: weight = g * v / ||v||; else just the tensor itself)."""
    gguf_name: str
    sources: tuple[str, ...]
    shape: tuple
    kind: str

    @property
    def folded(self) -> bool:
        return len(self.sources) == 2


def codec_tensors(codec: CodecConfig) -> list[CodecTensor]:
    """The codec's GGUF tensors in codec.pth order, weight-norm pairs folded (the v shape is the weight's)."""
    specs = codec_manifest(codec)
    by_name = {s.name: s for s in specs}
    out, done = [], set()
    for s in specs:
        if s.name in done:
            continue
        for g_suffix, v_suffix in _WN_PAIRS:
            if s.name.endswith(g_suffix):
                base = s.name[: -len(g_suffix)]
                v = by_name[base + v_suffix]
                out.append(CodecTensor(spec.GGUF_CODEC_TENSOR_PREFIX + base + ".weight", (s.name, v.name),
                                       tuple(v.shape), s.kind))
                done.update((s.name, v.name))
                break
        else:
            out.append(CodecTensor(spec.GGUF_CODEC_TENSOR_PREFIX + s.name, (s.name,), tuple(s.shape), s.kind))
            done.add(s.name)
    return out


# ----------------------------------------------------------------------------------------------------
# types
# ----------------------------------------------------------------------------------------------------

def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def type_nbytes(t: T, shape: tuple) -> int:
    """Bytes of a tensor of numpy `shape` stored as `t` (rows must be whole blocks)."""
    bs, ts = GGML_QUANT_SIZES[t]
    n = 1
    for d in shape:
        n *= d
    return n // bs * ts


def transformer_type(s: TensorSpec, wanted: T, quantized_names: set[str] | None = None) -> tuple[T, str | None]:
    """(type, why it is not `wanted` or None) of one transformer tensor. `quantized_names` limits a quantized
    `wanted` to those tensors (a phase's target); the other 2-D tensors are F16."""
    if len(s.shape) == 1:
        return T.F32, None
    if wanted not in FLOAT_TYPES and quantized_names is not None and s.name not in quantized_names:
        return T.F16, None
    if s.shape[-1] % block_size(wanted):
        return T.F16, f"{s.shape[-1]} columns are not whole {wanted.name} blocks of {block_size(wanted)}"
    return wanted, None


def codec_type(t: CodecTensor) -> T:
    if len(t.shape) >= 2 and t.gguf_name.endswith(".weight"):
        return T.F16
    return T.F32


def phase_type(phase) -> tuple[str, str]:
    """(--type name, how the phase maps) for a fishlab phase, or NoGGUFEquivalent when none is honest."""
    if phase.method == "fp8":
        raise NoGGUFEquivalent(f"phase {phase.label}: GGUF has no FP8 type; the nearest by size is q8_0 "
                               f"(8.5 bits per weight, int8 in blocks of 32): pass --type q8_0 to choose it")
    if phase.bits == 8:
        return "q8_0", (f"INT8 per {'row' if phase.group_size is None else f'group of {phase.group_size}'} -> "
                        f"Q8_0: int8 in blocks of 32 with an f16 scale")
    if phase.bits == 4:
        return "q4_0", (f"INT4 [-7,7] {'per row' if phase.group_size is None else f'g{phase.group_size}'} -> "
                        f"Q4_0: symmetric 4-bit [-8,7] in blocks of 32 with an f16 scale")
    if phase.bits == 3:
        raise NoGGUFEquivalent(f"phase {phase.label}: 3-bit GGUF types are K-quants (Q3_K), which gguf-py "
                               f"cannot quantize and fishlab has no proven packer for")
    raise NoGGUFEquivalent(f"phase {phase.label}: ternary INT2 would be TQ2_0/TQ1_0 (blocks of 256); s2.cpp's "
                           f"support for them is not verified and fishlab does not write them")


def phase_targets(cfg: DualARConfig, phase) -> set[str]:
    return {s.name for s in linear_targets(cfg, phase.target)}


# ----------------------------------------------------------------------------------------------------
# header
# ----------------------------------------------------------------------------------------------------

def transformer_keys(cfg: DualARConfig) -> list[tuple[str, object, V]]:
    """The transformer's header keys (key, value, GGUF type), values from config.json."""
    hf = cfg.to_hf_dict()
    a = hf["audio_decoder_config"]
    A, S = spec.GGUF_ARCH, spec.GGUF_S2_NS

    def fast(key, default):   # a missing/null fast field inherits the slow value (spec §2.1)
        v = a.get(key)
        return default if v is None else v

    u, f, b = V.UINT32, V.FLOAT32, V.BOOL
    return [
        (f"{A}.context_length", cfg.max_seq_len, u),
        (f"{A}.embedding_length", cfg.dim, u),
        (f"{A}.feed_forward_length", cfg.intermediate_size, u),
        (f"{A}.block_count", cfg.n_layer, u),
        (f"{A}.attention.head_count", cfg.n_head, u),
        (f"{A}.attention.head_count_kv", cfg.n_local_heads, u),
        (f"{A}.rope.freq_base", cfg.rope_base, f),
        (f"{A}.attention.layer_norm_rms_epsilon", cfg.norm_eps, f),
        (f"{A}.vocab_size", cfg.vocab_size, u),
        (f"{S}.model_type", "dual_ar", V.STRING),
        (f"{S}.codebook_size", cfg.codebook_size, u),
        (f"{S}.num_codebooks", cfg.num_codebooks, u),
        (f"{S}.semantic_begin_id", cfg.semantic_begin_id, u),
        (f"{S}.semantic_end_id", cfg.semantic_end_id, u),
        (f"{S}.audio_pad_token_id", cfg.audio_pad_token_id, u),
        (f"{S}.scale_codebook_embeddings", True, b),     # forced true by the reference (spec §2.1)
        (f"{S}.norm_fastlayer_input", True, b),          # forced true by the reference (spec §2.1)
        (f"{S}.tie_word_embeddings", cfg.tie_word_embeddings, b),
        (f"{S}.attention_qk_norm", cfg.attention_qk_norm, b),
        (f"{S}.fast_context_length", int(fast("max_seq_len", cfg.num_codebooks + 1)), u),
        (f"{S}.fast_embedding_length", cfg.fast_dim, u),
        (f"{S}.fast_feed_forward_length", cfg.fast_intermediate_size, u),
        (f"{S}.fast_block_count", cfg.fast_n_layer, u),
        (f"{S}.fast_head_count", cfg.fast_n_head, u),
        (f"{S}.fast_head_count_kv", cfg.fast_n_local_heads, u),
        (f"{S}.fast_head_dim", cfg.fast_head_dim, u),
        (f"{S}.fast_rope_freq_base", float(fast("rope_base", cfg.rope_base)), f),
        (f"{S}.fast_layer_norm_rms_eps", float(fast("norm_eps", cfg.norm_eps)), f),
        (f"{S}.fast_tie_word_embeddings", bool(a.get("tie_word_embeddings", False)), b),
        (f"{S}.fast_attention_qk_norm", cfg.fast_attention_qk_norm, b),
        (f"{S}.fast_attention_qkv_bias", bool(a.get("attention_qkv_bias", False)), b),
        (f"{S}.fast_attention_o_bias", bool(a.get("attention_o_bias", False)), b),
        (f"{S}.fast_project_in", cfg.has_fast_project_in, b),
    ]


def codec_keys(c: CodecConfig) -> list[tuple[str, object, V]]:
    """The codec's header keys. s2.cpp's `frame_length` is the encoder hop (512), not fishlab's 2048-sample
    code frame (CodecConfig.frame_length)."""
    p = f"{spec.GGUF_S2_NS}.codec."
    u, f, i, arr = V.UINT32, V.FLOAT32, V.INT32, V.ARRAY
    enc_t = next((c.encoder_transformer(s) for s in range(len(c.encoder_rates)) if c.encoder_transformer(s)), None)
    q = c.quantizer_transformer
    return [
        (p + "sample_rate", c.sample_rate, u),
        (p + "hop_length", c.hop_length, u),
        (p + "frame_length", c.hop_length, u),
        (p + "encoder_dim", c.encoder_dim, u),
        (p + "decoder_dim", c.decoder_dim, u),
        (p + "latent_dim", c.latent_dim, u),
        (p + "encoder_rates", list(c.encoder_rates), arr),
        (p + "decoder_rates", list(c.decoder_rates), arr),
        (p + "encoder_transformer_layers", list(c.encoder_transformer_layers), arr),
        (p + "decoder_transformer_layers", list(spec.GGUF_CODEC_DECODER_TRANSFORMER_LAYERS), arr),
        (p + "quantizer_type", spec.GGUF_CODEC_QUANTIZER_TYPE, V.STRING),
        (p + "quantizer_input_dim", c.latent_dim, u),
        (p + "quantizer_codebook_dim", c.codebook_dim, u),
        (p + "quantizer_residual_codebooks", c.n_residual_codebooks, u),
        (p + "quantizer_residual_codebook_size", c.residual_codebook_size, u),
        (p + "quantizer_semantic_codebook_size", c.semantic_codebook_size, u),
        (p + "quantizer_downsample_factor", list(c.downsample_factors), arr),
        (p + "transformer.block_size", spec.GGUF_CODEC_TRANSFORMER_BLOCK_SIZE, u),
        (p + "transformer.n_local_heads", spec.GGUF_CODEC_N_LOCAL_HEADS, i),
        (p + "transformer.head_dim", c.encoder_transformer_head_dim, u),
        (p + "transformer.rope_freq_base", enc_t.rope_base if enc_t else c.transformer_rope_base, f),
        (p + "transformer.layer_norm_rms_eps", enc_t.norm_eps if enc_t else c.transformer_norm_eps, f),
        (p + "rvq_transformer.window_size", q.window, u),
        (p + "rvq_transformer.block_size", spec.GGUF_CODEC_RVQ_BLOCK_SIZE, u),
        (p + "rvq_transformer.n_layer", q.n_layer, u),
        (p + "rvq_transformer.n_head", q.n_head, u),
        (p + "rvq_transformer.n_local_heads", spec.GGUF_CODEC_N_LOCAL_HEADS, i),
        (p + "rvq_transformer.head_dim", q.head_dim, u),
        (p + "rvq_transformer.dim", q.dim, u),
        (p + "rvq_transformer.feed_forward_length", q.intermediate_size, u),
        (p + "rvq_transformer.rope_freq_base", q.rope_base, f),
        (p + "rvq_transformer.layer_norm_rms_eps", q.norm_eps, f),
    ]


def is_s2pro_codec(c: CodecConfig) -> bool:
    """s2.cpp supports only S2 Pro's codec geometry (a smaller codec crashes it)."""
    return c == CodecConfig()


def gguf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name of the GGUF of `cfg`, in file order (transformer, then codec)."""
    return ([transformer_name(s.name) for s in transformer_manifest(cfg.transformer)]
            + [t.gguf_name for t in codec_tensors(cfg.codec)])
