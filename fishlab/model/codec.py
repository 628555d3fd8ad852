"""The S2 Pro codec ("modded DAC" + downsampling residual VQ), clean-room from ../shared/spec/s2pro-codec.md.

Read top to bottom: primitives (weight norm, Snake, causal convs), building blocks (residual unit, ConvNeXt
block, windowed transformer), the vector quantizers, then encoder / quantizer / decoder and the `Codec` that
ties them together.

Parameter names equal the reference state-dict names (= `fishlab.manifest.codec_manifest`), so a checkpoint
loads strictly. Weight-normed convs keep (g, v) as parameters under the reference names and compute
W = g * v / ||v|| (norm over every dim but 0) at every forward, exactly as the reference does, so a float32
model gives float32 weights and a bfloat16 model does the reparametrisation in bfloat16. The module has no
buffers: the RoPE table and the window mask are built per call, only as large as the call needs.

    codec = Codec(cfg)                      # or fishlab.model.codec_load.load_codec(path)
    codes = codec.encode(audio)             # [B, 1, N] or [B, N] -> [B, n_codebooks, ceil(N / frame_length)]
    audio = codec.decode(codes)             # [B, n_codebooks, T] -> [B, 1, frame_length * T], model dtype

`encode_steps` / `decode_steps` return every intermediate of the golden tests in one pass.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CodecConfig, CodecTransformerConfig
from .dualar import RMSNorm, apply_rope
from .dualar import rope_table as rope_rows

log = logging.getLogger("fishlab.codec")


# ----------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------

def weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """W = g * v / ||v||, the norm over every dim except 0, no epsilon (spec §2.2).

    For a ConvTranspose1d weight [in, out, k] dim 0 is the INPUT channel, so g is [in, 1, 1]."""
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return v * (g / norm)


class WeightNormParams(nn.Module):
    """Holder of g (`original0`) and v (`original1`); sits at `<conv>.parametrizations.weight`."""

    def __init__(self, g_shape: tuple, v_shape: tuple):
        super().__init__()
        self.original0 = nn.Parameter(torch.empty(g_shape))
        self.original1 = nn.Parameter(torch.empty(v_shape))


class WNConvWeights(nn.Module):
    """Weight + bias of a new-style weight-normed conv: names `bias`, `parametrizations.weight.original0/1`."""

    def __init__(self, v_shape: tuple, n_bias: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(n_bias))
        self.parametrizations = nn.ModuleDict({"weight": WeightNormParams((v_shape[0], 1, 1), v_shape)})

    @property
    def weight(self) -> Tensor:
        p = self.parametrizations["weight"]
        return weight_norm(p.original0, p.original1)


class PlainConvWeights(nn.Module):
    """Weight + bias of a conv without weight norm: names `weight`, `bias`."""

    def __init__(self, shape: tuple, n_bias: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(n_bias))


class Snake(nn.Module):
    """y = x + sin(alpha * x)^2 / (alpha + 1e-9), per channel, in the tensor's dtype (spec §2.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class CausalConv1d(nn.Module):
    """Left pad (k-1)*d + 1 - s, right pad up to a whole number of strides, then a valid conv (spec §2.3).

    Output length: L for s = 1, ceil(L / s) otherwise."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 weight_norm: bool = True):
        super().__init__()
        self.stride, self.dilation, self.groups, self.kernel = stride, dilation, groups, kernel
        shape = (cout, cin // groups, kernel)
        self.conv = WNConvWeights(shape, cout) if weight_norm else PlainConvWeights(shape, cout)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        left = (self.kernel - 1) * self.dilation + 1 - s
        right = (-x.shape[-1]) % s
        x = F.pad(x, (left, right))
        if s > 1 and self.groups == 1 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return strided_conv_as_matmul(x, self.conv.weight, self.conv.bias, s, self.dilation)
        return F.conv1d(x, self.conv.weight, self.conv.bias, stride=s, dilation=self.dilation, groups=self.groups)


_said = set()


def strided_conv_as_matmul(x: Tensor, w: Tensor, bias: Tensor | None, stride: int, dilation: int = 1) -> Tensor:
    """``F.conv1d(x, w, bias, stride, dilation)`` (groups 1, no padding) as windows of x times w: one matmul.

    The route of strided convs in bf16 / fp16 on the CPU. torch 2.13's oneDNN (v3.12) computes some of them
    wrongly on AMX machines (measured on an Intel Xeon with amx_bf16: relative error 1.0-1.2 for stride 4 with 16
    input channels and stride 8 with 8 or 16, 0.003 elsewhere; the encoder's stride-8 block is one), and the
    matmul route is right on every CPU. It costs a copy of the windows (kernel / stride times x)."""
    if x.dtype not in _said:
        _said.add(x.dtype)
        log.info("fishlab: codec strided convs in %s on the CPU run as unfold + matmul (oneDNN's strided "
                 "conv1d is wrong for some shapes on AMX CPUs)", str(x.dtype).replace("torch.", ""))
    cout, cin, k = w.shape
    cols = x.unfold(-1, (k - 1) * dilation + 1, stride)[..., ::dilation]     # [B, Cin, L_out, k]
    y = torch.einsum("bclk,ock->bol", cols, w)
    return y if bias is None else y + bias[:, None]


class CausalConvTranspose1d(nn.Module):
    """A plain transposed conv (no padding), then drop the last k - s samples (spec §2.4). Output L * s."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, weight_norm: bool = True):
        super().__init__()
        self.stride, self.kernel = stride, kernel
        shape = (cin, cout, kernel)
        self.conv = WNConvWeights(shape, cout) if weight_norm else PlainConvWeights(shape, cout)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv_transpose1d(x, self.conv.weight, self.conv.bias, stride=self.stride)
        trim = self.kernel - self.stride
        return y[..., : y.shape[-1] - trim] if trim > 0 else y


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))) (spec §2.5)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(Snake(channels), CausalConv1d(channels, channels, 7, dilation=dilation),
                                   Snake(channels), CausalConv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv -> LayerNorm(eps 1e-6) -> Linear -> exact GELU -> Linear -> * gamma, residual
    (spec §2.6). Channels-first in and out."""

    def __init__(self, dim: int, kernel: int = 7, mlp_ratio: int = 4):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))
        self.dwconv = CausalConv1d(dim, dim, kernel, groups=dim, weight_norm=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# Windowed causal transformer (spec §2.7)
# ----------------------------------------------------------------------------------------------------

def rope_table(n: int, head_dim: int, base: float) -> Tensor:
    """[n, head_dim/2, 2] bf16 (cos, sin) for positions 0..n-1, the same rows as the DualAR's tables (fp32 on
    the CPU so every device gets the same table, then bf16 as the reference stores it)."""
    return rope_rows(torch.arange(n), head_dim, base)


def window_mask(q0: int, q1: int, k0: int, k1: int, window: int, device) -> Tensor:
    """Boolean [q1-q0, k1-k0]: query i may see key j iff i - window < j <= i (absolute positions)."""
    i = torch.arange(q0, q1, device=device)[:, None]
    j = torch.arange(k0, k1, device=device)[None, :]
    return (j <= i) & (j > i - window)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    # Sequences longer than this are attended in blocks of this many queries (each block sees only the keys its
    # window can reach), so memory grows with T * window instead of T^2. Results equal the one-shot masked
    # attention up to float summation order.
    query_chunk = 2048

    def __init__(self, c: CodecTransformerConfig):
        super().__init__()
        self.n_head, self.head_dim, self.window = c.n_head, c.head_dim, c.window
        width = c.n_head * c.head_dim
        self.wqkv = nn.Linear(c.dim, 3 * width, bias=False)
        self.wo = nn.Linear(width, c.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        B, T, _ = x.shape
        width = self.n_head * self.head_dim
        q, k, v = self.wqkv(x).split([width, width, width], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        W, C = self.window, self.query_chunk
        if T <= C:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(0, T, 0, T, W, x.device))
        else:
            parts = []
            for a in range(0, T, C):
                b, k0 = min(a + C, T), max(0, a - W + 1)
                parts.append(F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, k0:b], v[:, :, k0:b], attn_mask=window_mask(a, b, k0, b, W, x.device)))
            y = torch.cat(parts, dim=2)
        return self.wo(y.transpose(1, 2).reshape(B, T, width))


class FeedForward(nn.Module):
    def __init__(self, c: CodecTransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.w3 = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, c: CodecTransformerConfig):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention_layer_scale = LayerScale(c.dim)
        self.ffn_layer_scale = LayerScale(c.dim)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowLimitedTransformer(nn.Module):
    """Channels-first [B, dim, T] in and out. Positions restart at 0 on every call."""

    def __init__(self, c: CodecTransformerConfig):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        rope = rope_table(x.shape[1], self.config.head_dim, self.config.rope_base).to(x.device)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# Vector quantizers (spec §4.2, §4.3)
# ----------------------------------------------------------------------------------------------------

class LegacyWNConv1x1(nn.Module):
    """A k=1 conv with the legacy weight-norm names `bias`, `weight_g` [out,1,1], `weight_v` [out,in,1]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(cout))
        self.weight_g = nn.Parameter(torch.empty(cout, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(cout, cin, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, weight_norm(self.weight_g, self.weight_v), self.bias)


class VectorQuantize(nn.Module):
    """Factorised VQ: project to codebook_dim, cosine nearest neighbour, raw codebook row -> out_proj."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = LegacyWNConv1x1(dim, codebook_dim)
        self.out_proj = LegacyWNConv1x1(codebook_dim, dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """r [B, dim, T] -> (out_proj(straight-through z_q) [B, dim, T], codes [B, T] int64)."""
        z_e = self.in_proj(r)
        B, D, T = z_e.shape
        e = F.normalize(z_e.transpose(1, 2).reshape(B * T, D), dim=1)
        c = F.normalize(self.codebook.weight, dim=1)
        # cosine nearest neighbour through the reference's exact distance expression; first max wins ties
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(dim=1).indices.view(B, T)
        z_q = self.codebook(codes).transpose(1, 2)
        z_q = z_e + (z_q - z_e)   # straight-through value, computed literally (not bit-equal to z_q)
        return self.out_proj(z_q), codes

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, T] (valid range) -> out_proj(codebook[codes]) [B, dim, T]; no normalisation."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVectorQuantize(nn.Module):
    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantize(dim, codebook_size, codebook_dim)
                                        for _ in range(n_codebooks))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Each stage quantises what the previous ones left: (sum of outputs [B,dim,T], codes [B,n,T])."""
        residual, total, codes = z, 0.0, []
        for q in self.quantizers:
            o, c = q.encode(residual)
            total = total + o
            residual = residual - o
            codes.append(c)
        if not codes:
            return torch.zeros_like(z), z.new_zeros(z.shape[0], 0, z.shape[2], dtype=torch.long)
        return total, torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor | float:
        """codes [B, n, T] -> sum over stages, added in stage order starting from 0.0."""
        total = 0.0
        for i, q in enumerate(self.quantizers):
            total = total + q.decode(codes[:, i])
        return total


# ----------------------------------------------------------------------------------------------------
# Encoder, quantizer, decoder
# ----------------------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """3 residual units at dim/2, Snake, strided conv dim/2 -> dim (kernel 2*stride), transformer or identity."""

    def __init__(self, dim: int, stride: int, transformer: CodecTransformerConfig | None):
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1), ResidualUnit(half, 3), ResidualUnit(half, 9), Snake(half),
            CausalConv1d(half, dim, 2 * stride, stride=stride),
            WindowLimitedTransformer(transformer) if transformer is not None else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, c: CodecConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(1, c.encoder_dim, 7)]
        for s, (stride, dim) in enumerate(zip(c.encoder_rates, c.encoder_stage_dims)):
            layers.append(EncoderBlock(dim, stride, c.encoder_transformer(s)))
        last = c.encoder_stage_dims[-1]
        layers += [Snake(last), CausalConv1d(last, c.latent_dim, 3)]
        self.block = nn.Sequential(*layers)

    def forward(self, audio: Tensor) -> Tensor:
        return self.block(audio)


class DecoderBlock(nn.Module):
    """Snake(in), causal transposed conv in -> out (kernel 2*stride), 3 residual units at out."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(Snake(cin), CausalConvTranspose1d(cin, cout, 2 * stride, stride),
                                   ResidualUnit(cout, 1), ResidualUnit(cout, 3), ResidualUnit(cout, 9))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, c: CodecConfig):
        super().__init__()
        d = c.decoder_stage_dims
        layers: list[nn.Module] = [CausalConv1d(c.latent_dim, d[0], 7)]
        layers += [DecoderBlock(d[i], d[i + 1], stride) for i, stride in enumerate(c.decoder_rates)]
        layers += [Snake(d[-1]), CausalConv1d(d[-1], 1, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z)


class Quantizer(nn.Module):
    """DownsampleResidualVectorQuantize: downsample -> pre_module -> semantic VQ + residual RVQ (encode);
    codebook sum -> post_module -> upsample (decode)."""

    def __init__(self, c: CodecConfig):
        super().__init__()
        d = c.latent_dim
        self.semantic_quantizer = ResidualVectorQuantize(d, 1, c.semantic_codebook_size, c.codebook_dim)
        self.quantizer = ResidualVectorQuantize(d, c.n_residual_codebooks, c.residual_codebook_size,
                                                c.codebook_dim)

        def stage(conv: nn.Module) -> nn.Sequential:
            return nn.Sequential(conv, ConvNeXtBlock(d, c.convnext_kernel, c.convnext_mlp_ratio))

        self.downsample = nn.Sequential(*[stage(CausalConv1d(d, d, f, stride=f, weight_norm=False))
                                          for f in c.downsample_factors])
        # built in reverse stage order, as the reference does
        self.upsample = nn.Sequential(*[stage(CausalConvTranspose1d(d, d, f, f, weight_norm=False))
                                        for f in reversed(c.downsample_factors)])
        self.pre_module = WindowLimitedTransformer(c.quantizer_transformer)
        self.post_module = WindowLimitedTransformer(c.quantizer_transformer)

    def quantize(self, z: Tensor) -> Tensor:
        """pre_module output [B, dim, T] -> codes [B, 1 + n_residual, T] int64 (row 0 semantic)."""
        o_sem, c_sem = self.semantic_quantizer.encode(z)
        _, c_res = self.quantizer.encode(z - o_sem)
        return torch.cat([c_sem, c_res], dim=1)

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """In-range codes [B, n, T] -> z_q = semantic + sum of residual outputs [B, dim, T] (post_module input)."""
        return self.semantic_quantizer.decode(codes[:, :1]) + self.quantizer.decode(codes[:, 1:])


# ----------------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------------

class Codec(nn.Module):
    """S2 Pro's codec from a `CodecConfig`. Parameters are allocated uninitialised and then filled by
    `init_weights()` (skipped on the meta device); loading a checkpoint overwrites them."""

    def __init__(self, config: CodecConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else CodecConfig()
        self.encoder = Encoder(config)
        self.quantizer = Quantizer(config)
        self.decoder = Decoder(config)
        if self.encoder.block[0].conv.bias.device.type != "meta":
            self.init_weights()

    # --- facts ---
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_length(self) -> int:
        return self.config.frame_length

    @property
    def n_codebooks(self) -> int:
        return self.config.n_codebooks

    def _param(self) -> Tensor:
        return self.encoder.block[0].conv.bias

    def code_lengths(self, audio_lengths: Tensor) -> Tensor:
        """Frames per item for audio lengths in samples: ceil(N / frame_length)."""
        return torch.div(audio_lengths + self.frame_length - 1, self.frame_length, rounding_mode="floor")

    # --- encode ---
    def pad_audio(self, audio: Tensor) -> Tensor:
        """[B, N] or [B, 1, N] -> [B, 1, N'] on the model's device and dtype, zero right-padded to a whole
        number of frames."""
        if audio.dim() == 2:
            audio = audio[:, None]
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be [B, N] or [B, 1, N] (mono), got shape {tuple(audio.shape)}")
        if audio.shape[-1] == 0:
            raise ValueError("audio has no samples")
        p = self._param()
        audio = audio.to(device=p.device, dtype=p.dtype)
        return F.pad(audio, (0, (-audio.shape[-1]) % self.frame_length))

    def encode_latent(self, audio: Tensor) -> Tensor:
        """Padded encoder output [B, latent, N' / hop_length]."""
        return self.encoder(self.pad_audio(audio))

    @torch.no_grad()
    def encode_steps(self, audio: Tensor) -> dict[str, Tensor]:
        """Every encode intermediate: latent, downsampled, pre_module, codes."""
        latent = self.encode_latent(audio)
        down = self.quantizer.downsample(latent)
        pre = self.quantizer.pre_module(down)
        return {"latent": latent, "downsampled": down, "pre_module": pre, "codes": self.quantizer.quantize(pre)}

    def encode(self, audio: Tensor) -> Tensor:
        """audio [B, 1, N] or [B, N] -> codes [B, n_codebooks, ceil(N / frame_length)] int64. Runs without
        gradients; the post_module/upsample work the reference does and discards here is skipped."""
        return self.encode_steps(audio)["codes"]

    # --- decode ---
    def clamp_codes(self, codes: Tensor) -> Tensor:
        """A clamped COPY of codes [B, n_codebooks, T] on the model's device (int64): row 0 to at most
        semantic_codebook_size - 1, rows 1.. to at most residual_codebook_size - 1, as the reference's decode
        does. Unlike the reference (which clamps the caller's tensor in place) the input is never modified.
        Negative codes have no meaning (the reference has no lower clamp) and raise ValueError."""
        if codes.dim() != 3 or codes.shape[1] != self.n_codebooks:
            raise ValueError(f"codes must be [B, {self.n_codebooks}, T], got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.shape[-1] == 0:
            raise ValueError("codes have no frames")
        codes = codes.to(device=self._param().device, dtype=torch.long)
        negative = codes < 0
        if bool(negative.any()):
            b, row, t = (int(i) for i in negative.nonzero()[0])
            raise ValueError(f"codes contain {int(negative.sum())} negative value(s), first at [{b}, {row}, {t}] "
                             f"= {int(codes[b, row, t])}; codes must be >= 0")
        c = self.config
        return torch.cat([codes[:, :1].clamp(max=c.semantic_codebook_size - 1),
                          codes[:, 1:].clamp(max=c.residual_codebook_size - 1)], dim=1)

    @torch.no_grad()
    def decode_steps(self, codes: Tensor) -> dict[str, Tensor]:
        """Every decode intermediate: codes (clamped copy), z_q, post_module, upsampled, audio."""
        codes = self.clamp_codes(codes)
        z_q = self.quantizer.codes_to_latent(codes)
        post = self.quantizer.post_module(z_q)
        up = self.quantizer.upsample(post)
        return {"codes": codes, "z_q": z_q, "post_module": post, "upsampled": up, "audio": self.decoder(up)}

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, n_codebooks, T] -> audio [B, 1, frame_length * T] in the model's dtype (no trimming;
        truncate to the original length yourself). Out-of-range codes are clamped on a copy (see
        `clamp_codes`); the caller's tensor is left unchanged. Runs without gradients."""
        return self.decode_steps(codes)["audio"]

    # --- a random init for demo checkpoints and tests (the golden sets' scheme, README §2) ---
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "Codec":
        """Fill every parameter with a seeded random init that gives a stable, non-trivial codec (weight norm
        g ~ U(0.7, 1.3) (U(0.1, 0.3) for residual-unit 1x1 convs), v ~ N(0, 0.02), biases N(0, 0.01), Snake
        alpha = exp(0.25 N), codebooks N(0, 1), linears N(0, fan_in^-0.5), plain convs N(0, fan_in^-0.5),
        norm weights 1 + 0.1 N, LayerScale / ConvNeXt gamma U(0.05, 0.3)). Not the trained weights."""
        gen = torch.Generator().manual_seed(seed)

        def normal(p: Tensor, mean: float, std: float) -> None:
            p.copy_(torch.empty(p.shape).normal_(mean, std, generator=gen))

        def uniform(p: Tensor, lo: float, hi: float) -> None:
            p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=gen))

        for name, mod in self.named_modules():
            if isinstance(mod, WeightNormParams):
                uniform(mod.original0, 0.7, 1.3)
                normal(mod.original1, 0.0, 0.02)
            elif isinstance(mod, WNConvWeights):
                normal(mod.bias, 0.0, 0.01)
            elif isinstance(mod, LegacyWNConv1x1):
                normal(mod.bias, 0.0, 0.01)
                uniform(mod.weight_g, 0.7, 1.3)
                normal(mod.weight_v, 0.0, 0.02)
            elif isinstance(mod, PlainConvWeights):
                w = mod.weight   # conv [out, in/groups, k]; transposed (upsample) [in, out, k]
                normal(w, 0.0, (w.shape[0] if ".upsample." in name else w.shape[1] * w.shape[2]) ** -0.5)
                normal(mod.bias, 0.0, 0.01)
            elif isinstance(mod, Snake):
                mod.alpha.copy_(torch.empty(mod.alpha.shape).normal_(0.0, 0.25, generator=gen).exp())
            elif isinstance(mod, nn.Embedding):
                normal(mod.weight, 0.0, 1.0)
            elif isinstance(mod, nn.Linear):
                normal(mod.weight, 0.0, mod.weight.shape[1] ** -0.5)
                if mod.bias is not None:
                    normal(mod.bias, 0.0, 0.01)
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                normal(mod.weight, 1.0, 0.1)
                if getattr(mod, "bias", None) is not None:
                    normal(mod.bias, 0.0, 0.01)
            elif isinstance(mod, LayerScale):
                uniform(mod.gamma, 0.05, 0.3)
            elif isinstance(mod, ConvNeXtBlock):
                uniform(mod.gamma, 0.05, 0.3)
        for mod in self.modules():   # small output 1x1 convs keep the residual stacks stable
            if isinstance(mod, ResidualUnit):
                uniform(mod.block[3].conv.parametrizations["weight"].original0, 0.1, 0.3)
        return self
