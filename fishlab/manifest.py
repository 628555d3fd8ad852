"""Every tensor a config implies: name, shape, dtype, component, kind.

One function per model (`transformer_manifest`, `codec_manifest`), each a flat list of `TensorSpec` in the
order of the real files. For the `s2-pro` preset this equals ../shared/spec/s2pro-manifest.json exactly.

Vocabulary:
- component: `slow_ar` | `fast_ar` (their linear weights) | `embeddings` (token, codebook and fast tables;
  the token table is also the tied head) | `norms` (all transformer RMSNorm weights) | `codec`.
- kind: `linear` | `embedding` | `norm` | `conv` | `other`.
- group: a finer split used in reports (e.g. `slow_layers`, `fast_output`, `pre_module`).
- projection: `wqkv` | `wo` | `w1` | `w2` | `w3` | `output` for the AR linears, else None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import spec
from .config import CodecConfig, DualARConfig, ModelConfig, TextLMConfig

COMPONENTS = ("slow_ar", "fast_ar", "embeddings", "norms", "codec")
PROJECTIONS = ("wqkv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class TensorSpec:
    name: str                  # name in the file (HF name for the transformer, state-dict name for the codec)
    shape: tuple
    dtype: str
    component: str
    kind: str
    group: str
    internal: str | None = None   # internal (fish-speech) name for transformer tensors
    layer: int | None = None
    projection: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * spec.DTYPE_BYTES[self.dtype]


def hf_to_internal(name: str) -> str:
    """The HF -> internal rule of spec §3.2."""
    if name.startswith(spec.HF_TEXT_PREFIX):
        return name[len(spec.HF_TEXT_PREFIX):]
    if name.startswith(spec.HF_CODEBOOK_EMB):
        return name[len(spec.HF_AUDIO_PREFIX):]
    if name.startswith(spec.HF_AUDIO_PREFIX):
        return "fast_" + name[len(spec.HF_AUDIO_PREFIX):]
    return name


def _ar_layer(prefix: str, i: int, dim: int, qkv_rows: int, q_width: int, head_dim: int, inter: int,
              qk_norm: bool, dtype: str, linear_component: str, group: str) -> list[TensorSpec]:
    p = f"{prefix}layers.{i}."

    def lin(suffix, shape, proj):
        return TensorSpec(p + suffix, shape, dtype, linear_component, "linear", group, layer=i, projection=proj)

    def norm(suffix, n):
        return TensorSpec(p + suffix, (n,), dtype, "norms", "norm", group, layer=i)

    out = [lin("attention.wqkv.weight", (qkv_rows, dim), "wqkv"),
           lin("attention.wo.weight", (dim, q_width), "wo")]
    if qk_norm:
        out += [norm("attention.q_norm.weight", head_dim), norm("attention.k_norm.weight", head_dim)]
    out += [lin("feed_forward.w1.weight", (inter, dim), "w1"),
            lin("feed_forward.w3.weight", (inter, dim), "w3"),
            lin("feed_forward.w2.weight", (dim, inter), "w2"),
            norm("ffn_norm.weight", dim), norm("attention_norm.weight", dim)]
    return out


def transformer_manifest(c: DualARConfig | TextLMConfig, dtype: str | None = None) -> list[TensorSpec]:
    """S2 Pro's DualAR tensors in file order; for a text LM (`TextLMConfig`) the slow-AR part alone (token
    table = tied head, the layers, the final norm) under the same names."""
    dt = dtype or c.dtype
    t, a = spec.HF_TEXT_PREFIX, spec.HF_AUDIO_PREFIX
    text_lm = isinstance(c, TextLMConfig)
    out = [TensorSpec(t + "embeddings.weight", (c.vocab_size, c.dim), dt, "embeddings", "embedding",
                      "slow_embeddings_tied_head")]
    if not text_lm:
        out.append(TensorSpec(a + "codebook_embeddings.weight", (c.codebook_size * c.num_codebooks, c.dim), dt,
                              "embeddings", "embedding", "slow_codebook_embeddings"))
    for i in range(c.n_layer):
        out += _ar_layer(t, i, c.dim, c.qkv_rows, c.q_width, c.head_dim, c.intermediate_size,
                         c.attention_qk_norm, dt, "slow_ar", "slow_layers")
    out.append(TensorSpec(t + "norm.weight", (c.dim,), dt, "norms", "norm", "slow_final_norm"))
    if text_lm:
        return _with_internal(out)
    out.append(TensorSpec(a + "embeddings.weight", (c.codebook_size, c.fast_dim), dt, "embeddings", "embedding",
                          "fast_embeddings"))
    if c.has_fast_project_in:
        out.append(TensorSpec(a + "fast_project_in.weight", (c.fast_dim, c.dim), dt, "fast_ar", "linear",
                              "fast_layers", projection="project_in"))
    for i in range(c.fast_n_layer):
        out += _ar_layer(a, i, c.fast_dim, c.fast_qkv_rows, c.fast_q_width, c.fast_head_dim,
                         c.fast_intermediate_size, False, dt, "fast_ar", "fast_layers")
    out.append(TensorSpec(a + "norm.weight", (c.fast_dim,), dt, "norms", "norm", "fast_norm"))
    out.append(TensorSpec(a + "output.weight", (c.codebook_size, c.fast_dim), dt, "fast_ar", "linear",
                          "fast_output", projection="output"))
    return _with_internal(out)


def _with_internal(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(s.name, tuple(s.shape), s.dtype, s.component, s.kind, s.group, hf_to_internal(s.name),
                       s.layer, s.projection) for s in specs]


# --------------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------------

def _codec_specs(c: CodecConfig, dtype: str) -> list[tuple[str, tuple, str, str]]:
    """(name, shape, kind, group) of every codec parameter, in the state-dict order of the reference."""
    out: list[tuple[str, tuple, str, str]] = []

    def wn_conv(p, cout, cin, k, group, transposed=False):
        g0 = cin if transposed else cout
        v = (cin, cout, k) if transposed else (cout, cin, k)
        out.extend([(p + "conv.bias", (cout,), "conv", group),
                    (p + "conv.parametrizations.weight.original0", (g0, 1, 1), "conv", group),
                    (p + "conv.parametrizations.weight.original1", v, "conv", group)])

    def snake(p, ch, group):
        out.append((p + "alpha", (1, ch, 1), "other", group))

    def res_unit(p, ch, group):
        snake(p + "block.0.", ch, group)
        wn_conv(p + "block.1.", ch, ch, 7, group)
        snake(p + "block.2.", ch, group)
        wn_conv(p + "block.3.", ch, ch, 1, group)

    def transformer(p, t, group):
        for i in range(t.n_layer):
            q = f"{p}layers.{i}."
            qw = t.n_head * t.head_dim
            out.extend([(q + "attention.wqkv.weight", (3 * qw, t.dim), "linear", group),
                        (q + "attention.wo.weight", (t.dim, qw), "linear", group),
                        (q + "feed_forward.w1.weight", (t.intermediate_size, t.dim), "linear", group),
                        (q + "feed_forward.w3.weight", (t.intermediate_size, t.dim), "linear", group),
                        (q + "feed_forward.w2.weight", (t.dim, t.intermediate_size), "linear", group),
                        (q + "ffn_norm.weight", (t.dim,), "norm", group),
                        (q + "attention_norm.weight", (t.dim,), "norm", group),
                        (q + "attention_layer_scale.gamma", (t.dim,), "other", group),
                        (q + "ffn_layer_scale.gamma", (t.dim,), "other", group)])
        out.append((p + "norm.weight", (t.dim,), "norm", group))

    def vq(p, size, group):
        d, cd = c.latent_dim, c.codebook_dim
        out.extend([(p + "in_proj.bias", (cd,), "conv", group),
                    (p + "in_proj.weight_g", (cd, 1, 1), "conv", group),
                    (p + "in_proj.weight_v", (cd, d, 1), "conv", group),
                    (p + "out_proj.bias", (d,), "conv", group),
                    (p + "out_proj.weight_g", (d, 1, 1), "conv", group),
                    (p + "out_proj.weight_v", (d, cd, 1), "conv", group),
                    (p + "codebook.weight", (size, cd), "embedding", group)])

    def resample(p, group, transposed):
        d = c.latent_dim
        factors = reversed(c.downsample_factors) if transposed else c.downsample_factors  # upsample: reverse order
        for i, f in enumerate(factors):
            s = f"{p}{i}."
            out.extend([(s + "0.conv.weight", (d, d, f), "conv", group),
                        (s + "0.conv.bias", (d,), "conv", group),
                        (s + "1.gamma", (d,), "other", group),
                        (s + "1.dwconv.conv.weight", (d, 1, c.convnext_kernel), "conv", group),
                        (s + "1.dwconv.conv.bias", (d,), "conv", group),
                        (s + "1.norm.weight", (d,), "norm", group),
                        (s + "1.norm.bias", (d,), "norm", group),
                        (s + "1.pwconv1.weight", (c.convnext_mlp_ratio * d, d), "linear", group),
                        (s + "1.pwconv1.bias", (c.convnext_mlp_ratio * d,), "linear", group),
                        (s + "1.pwconv2.weight", (d, c.convnext_mlp_ratio * d), "linear", group),
                        (s + "1.pwconv2.bias", (d,), "linear", group)])

    # encoder
    enc_dims = c.encoder_stage_dims
    wn_conv("encoder.block.0.", c.encoder_dim, 1, 7, "encoder_convs")
    for s, (stride, dim) in enumerate(zip(c.encoder_rates, enc_dims)):
        p = f"encoder.block.{s + 1}.block."
        half = dim // 2
        for r in range(3):
            res_unit(f"{p}{r}.", half, "encoder_convs")
        snake(f"{p}3.", half, "encoder_convs")
        wn_conv(f"{p}4.", dim, half, 2 * stride, "encoder_convs")
        t = c.encoder_transformer(s)
        if t is not None:
            transformer(f"{p}5.", t, "encoder_transformer")
    n = len(c.encoder_rates)
    snake(f"encoder.block.{n + 1}.", enc_dims[-1], "encoder_convs")
    wn_conv(f"encoder.block.{n + 2}.", c.latent_dim, enc_dims[-1], 3, "encoder_convs")
    # quantizer
    vq("quantizer.semantic_quantizer.quantizers.0.", c.semantic_codebook_size, "vq_semantic")
    for i in range(c.n_residual_codebooks):
        vq(f"quantizer.quantizer.quantizers.{i}.", c.residual_codebook_size, "vq_residual")
    resample("quantizer.downsample.", "downsample", False)
    resample("quantizer.upsample.", "upsample", True)
    transformer("quantizer.pre_module.", c.quantizer_transformer, "pre_module")
    transformer("quantizer.post_module.", c.quantizer_transformer, "post_module")
    # decoder
    dd = c.decoder_stage_dims
    wn_conv("decoder.model.0.", dd[0], c.latent_dim, 7, "decoder")
    for s, stride in enumerate(c.decoder_rates):
        p = f"decoder.model.{s + 1}.block."
        cin, cout = dd[s], dd[s + 1]
        snake(p + "0.", cin, "decoder")
        wn_conv(p + "1.", cout, cin, 2 * stride, "decoder", transposed=True)
        for r in range(3):
            res_unit(f"{p}{r + 2}.", cout, "decoder")
    m = len(c.decoder_rates)
    snake(f"decoder.model.{m + 1}.", dd[-1], "decoder")
    wn_conv(f"decoder.model.{m + 2}.", 1, dd[-1], 7, "decoder")
    return out


def codec_manifest(c: CodecConfig, dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(name, shape, dtype, "codec", kind, group) for name, shape, kind, group in _codec_specs(c, dtype)]


def manifest(cfg: ModelConfig) -> list[TensorSpec]:
    return transformer_manifest(cfg.transformer) + ([] if cfg.codec is None else codec_manifest(cfg.codec))


def totals(specs: list[TensorSpec], by: str = "component") -> dict[str, dict]:
    """{key: {'params': n, 'tensors': n, 'bytes': n}} grouped by a TensorSpec field."""
    out: dict[str, dict] = {}
    for s in specs:
        d = out.setdefault(str(getattr(s, by)), {"params": 0, "tensors": 0, "bytes": 0})
        d["params"] += s.numel
        d["tensors"] += 1
        d["bytes"] += s.nbytes
    return out


def linear_targets(c: DualARConfig | TextLMConfig, target: str) -> list[TensorSpec]:
    """The linear weights a quantization target covers: `slow` = every slow-AR layer linear (5 per layer),
    `all` = slow + fast layers + fast output (+ fast_project_in when present). A text LM has only decoder
    linears: both targets cover every one of them."""
    specs = [s for s in transformer_manifest(c) if s.kind == "linear"]
    if target == "slow":
        return [s for s in specs if s.component == "slow_ar"]
    if target == "all":
        return specs
    raise ValueError(f"unknown target {target!r}; known targets: slow, all")
