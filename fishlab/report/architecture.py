"""The tables and sentences of the architecture report (notebooks/00_architecture), from the config and
`sizes.size_analysis`'s result. Each function returns something a notebook displays (HTML table or Markdown)."""
from __future__ import annotations

from IPython.display import Markdown

from .. import manifest
from ..config import ModelConfig
from . import tables
from .tables import HTML, fmt_bytes


def model_text(cfg: ModelConfig, analysis: dict, params_from: str) -> Markdown:
    p = analysis["params"]
    return Markdown(f"Model: **{cfg.name}** — {p['transformer']:,} transformer parameters, {p['codec']:,} codec "
                    f"parameters; phases from `{params_from}`.")


def checkpoint_section(ck: dict) -> list:
    """The files of an inspected checkpoint (`checkpoint.inspect_checkpoint`) and what its headers say."""
    files = [{"file": k, "bytes": v} for k, v in {**ck["files"], **ck["other_files"]}.items()]
    return [tables.table(files, ["file", ("bytes", "bytes", fmt_bytes)], caption=f"Checkpoint {ck['path']}"),
            Markdown(f"{ck['tensors']} tensors ({ck['dtypes']}), all matching the config; tensor data "
                     f"{fmt_bytes(ck['tensor_data_bytes'])}, manifest predicts {fmt_bytes(ck['manifest_bytes'])}.")]


def transformer_table(cfg: ModelConfig) -> HTML:
    t = cfg.transformer
    rows = [
        {"": "layers", "slow AR": t.n_layer, "fast AR": t.fast_n_layer},
        {"": "dim", "slow AR": t.dim, "fast AR": t.fast_dim},
        {"": "heads (query / KV)", "slow AR": f"{t.n_head} / {t.n_local_heads}",
         "fast AR": f"{t.fast_n_head} / {t.fast_n_local_heads}"},
        {"": "head_dim", "slow AR": t.head_dim, "fast AR": t.fast_head_dim},
        {"": "fused QKV rows", "slow AR": t.qkv_rows, "fast AR": t.fast_qkv_rows},
        {"": "SwiGLU intermediate", "slow AR": t.intermediate_size, "fast AR": t.fast_intermediate_size},
        {"": "QK-norm", "slow AR": t.attention_qk_norm, "fast AR": t.fast_attention_qk_norm},
        {"": "vocabulary / head", "slow AR": f"{t.vocab_size:,} (tied)", "fast AR": f"{t.codebook_size:,} (own output)"},
        {"": "positions", "slow AR": f"{t.max_seq_len:,}", "fast AR": f"{t.num_codebooks} (one per codebook)"},
        {"": "RoPE base / norm eps", "slow AR": f"{t.rope_base:g} / {t.norm_eps:g}", "fast AR": "same (slow values)"},
    ]
    return tables.table(rows, caption="DualAR transformer")


def codec_table(cfg: ModelConfig) -> HTML:
    c = cfg.codec
    q = c.quantizer_transformer
    return tables.table([
        {"": "sample rate", "value": f"{c.sample_rate} Hz"},
        {"": "frame", "value": f"{c.frame_length} samples = {c.frames_per_second:.3f} frames/s"},
        {"": "codebooks", "value": f"1 semantic × {c.semantic_codebook_size} + {c.n_residual_codebooks} residual × "
                                   f"{c.residual_codebook_size}, dim {c.codebook_dim}"},
        {"": "encoder", "value": f"dim {c.encoder_dim}, strides {list(c.encoder_rates)}, transformer layers "
                                 f"{list(c.encoder_transformer_layers)}"},
        {"": "pre/post transformers", "value": f"{q.n_layer} layers, dim {q.dim}, window {q.window}"},
        {"": "decoder", "value": f"dim {c.decoder_dim}, strides {list(c.decoder_rates)}"},
    ], caption="Codec (modded DAC)")


def component_table(cfg: ModelConfig) -> HTML:
    by_comp = manifest.totals(manifest.transformer_manifest(cfg.transformer) + manifest.codec_manifest(cfg.codec),
                              "component")
    return tables.table([{"component": k, **v} for k, v in by_comp.items()],
                        ["component", ("tensors", "tensors"), ("params", "parameters"),
                         ("bytes", "bytes as stored", fmt_bytes)],
                        caption=f"Per component (as stored: transformer {cfg.transformer.dtype}, codec float32)")


def parameter_groups(cfg: ModelConfig) -> dict:
    """Totals per tensor group, the codec's prefixed `codec/` (what plots.param_breakdown draws)."""
    return {**manifest.totals(manifest.transformer_manifest(cfg.transformer), "group"),
            **{"codec/" + k: v for k, v in manifest.totals(manifest.codec_manifest(cfg.codec), "group").items()}}


def estimates_table(analysis: dict) -> HTML:
    return tables.table(analysis["estimates"], [
        ("label", "layout"), ("quantized_tensors", "quantized tensors"), ("scale_bytes", "scales", fmt_bytes),
        ("transformer_bytes", "transformer", fmt_bytes), ("total_bytes", "with codec", fmt_bytes),
        ("compression_vs_bf16", "× smaller than bf16 (transformer)", lambda x: f"{x:.2f}×")])


def reconciliation_table(analysis: dict) -> HTML:
    return tables.table(analysis["reconciliation"], [
        ("published", "published file"), ("published_gb", "published GB"), ("fishlab_gb", "fishlab GB"),
        ("difference_gb", "difference GB", lambda x: f"{x:+.3f}"),
        ("difference_pct", "difference %", lambda x: f"{x:+.1f}%"),
        ("likely_layout", "closest computed layout"), ("likely_residual_gb", "remaining GB", lambda x: f"{x:+.3f}")])


_TRAFFIC_PARTS = ("slow_ar", "tied_head", "fast_ar", "embedding_rows", "norms", "total")


def traffic_table(analysis: dict) -> HTML:
    tr = analysis["traffic_per_frame"]
    return tables.table([{"layout": k, **v} for k, v in tr.items()],
                        ["layout"] + [(k, k, fmt_bytes) for k in _TRAFFIC_PARTS])


def traffic_text(analysis: dict) -> Markdown:
    """Which part moves the most weight bytes per frame in bf16, and the bandwidth real time needs."""
    bf16 = analysis["traffic_per_frame"]["bf16"]
    top = max((k for k in bf16 if k != "total"), key=bf16.get)
    fps = analysis["frames_per_second"]
    return Markdown(f"In bf16, **{top}** moves the most bytes per frame ({bf16[top] / bf16['total']:.0%} of "
                    f"{fmt_bytes(bf16['total'])}); real time ({fps:.2f} frames/s) needs "
                    f"{bf16['total'] * fps / 1e9:.0f} GB/s of weight bandwidth.")
