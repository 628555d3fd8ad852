"""Build a DualAR model from a checkpoint directory in the real HF layout (transformer part).

Reading and strict validation are `fishlab.checkpoint`'s job (`load_transformer_state_dict`: the index's shards
or a single model.safetensors, checked name by name and shape by shape against the manifest, one
`CheckpointError` naming the files and the first few missing / unexpected / wrong-shape tensors with counts).
This module maps HF names to internal names (`fishlab.manifest.hf_to_internal`) and assembles the model.

Quantization seam: every linear layer is built by ONE function, `linear_from_tensors(name, tensors)`, which
gets the internal module name (e.g. `layers.3.attention.wqkv`) and that module's tensors with the module
prefix stripped: `{"weight": W}` for a plain weight, `{"weight": QTensor}` for a quantized one. The default
factory turns a QTensor into a `QuantizedLinear` (packed data and scales kept as stored). After assembly every
`QuantizedLinear` is prepared for the model's device and dtype (`prepare_linears`): each picks its route once
(torch's INT8 / INT4 / FP8 kernels where the device has them, else the weight dequantized once), the routes are
logged once per model (logger "fishlab.model") and `routes(model)` sums them up for reports.

Quantized checkpoints (a `quantization.json` beside the weights, written by `fishlab.quant.apply`) go through
the same `load_transformer` call: `load_quantized_tensors` validates them strictly against the config and the
per-tensor descriptions, quantized `X.weight` arrive as QTensors, and `dtype` applies only to the float
tensors (embeddings, norms, unquantized linears) and therefore to the activations. Same path on CPU and CUDA;
the route of each linear is chosen for the device it is loaded on (`fishlab.quant.qlinear.plan_route`).

`model_weight_bytes(model)` reports the bytes the model's weights hold in memory (parameters + packed buffers,
KV caches excluded) per manifest component.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import CheckpointError, load_transformer_state_dict
from ..config import DualARConfig, TextLMConfig, load_transformer_config
from ..manifest import hf_to_internal
from ..quant.primitives import QTensor, QuantError, SchemeError, dequantize_tensor
from ..quant import cgemv
from ..quant.qlinear import Linear, QuantizedLinear
from .dualar import TORCH_DTYPES, DualARTransformer, KVCache, linear_names, replace_linears
from .textlm import TextLM

__all__ = ["CheckpointError", "LinearFactory", "linear_from_tensors", "model_class", "build_transformer",
           "load_transformer", "load_quantized_transformer", "is_quantized_checkpoint", "model_weight_bytes",
           "prepare_linears", "routes"]

log = logging.getLogger("fishlab.model")

LinearFactory = Callable[[str, "dict[str, Tensor | QTensor]"], nn.Module]


def linear_from_tensors(name: str, tensors: dict[str, Tensor | QTensor]) -> nn.Module:
    """The default linear: {"weight": W [out, in]} -> nn.Linear without bias; {"weight": QTensor} ->
    `QuantizedLinear` holding the packed data and scales as stored (on the QTensor's device)."""
    if set(tensors) != {"weight"}:
        raise CheckpointError(f"linear {name!r}: expected exactly a 'weight' tensor, got {sorted(tensors)}")
    w = tensors["weight"]
    if isinstance(w, QTensor):
        return QuantizedLinear.from_qtensor(w)
    lin = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def _shape(t: Tensor | QTensor) -> tuple:
    return tuple(t.shape)


def model_class(cfg: DualARConfig | TextLMConfig) -> type[nn.Module]:
    """The module a config builds: `TextLM` for a text LM, else S2 Pro's `DualARTransformer`."""
    return TextLM if isinstance(cfg, TextLMConfig) else DualARTransformer


def build_transformer(cfg: DualARConfig | TextLMConfig, tensors: dict[str, Tensor | QTensor],
                      linear_factory: LinearFactory = linear_from_tensors, source: str = "checkpoint",
                      consume: bool = False) -> DualARTransformer | TextLM:
    """Assemble a model from {internal name: tensor or QTensor} (already on the target device and dtype).

    Linear modules come from `linear_factory(module_name, {suffix: tensor})`; everything else (embeddings,
    norms) is assigned strictly by parameter name. A QTensor outside a linear (no phase makes one today) is
    dequantized to the dtype of the model's float tensors. Any tensor left over, or any parameter left unset,
    is a `CheckpointError` naming `source`. consume=True empties `tensors` as it goes, so the caller's dict
    does not keep tensors alive that the factory replaced (e.g. INT4 data re-laid out for the CPU kernel).
    """
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    rest = tensors if consume else dict(tensors)
    expected_shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def make(name: str, old: nn.Linear) -> nn.Module:
        prefix = name + "."
        group = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
        if not group:
            raise CheckpointError(f"{source}: no tensors for linear {name!r}")
        if set(group) == {"weight"} and _shape(group["weight"]) != expected_shapes[name]:
            raise CheckpointError(f"{source}: {name}.weight has shape {list(_shape(group['weight']))}, "
                                  f"expected {list(expected_shapes[name])}")
        return linear_factory(name, group)

    built = replace_linears(model, make, names=linear_names(model))
    qrest = [k for k, v in rest.items() if isinstance(v, QTensor)]
    if qrest:
        floats = [v.dtype for v in rest.values() if isinstance(v, Tensor) and v.is_floating_point()]
        fdtype = floats[0] if floats else None
        for k in qrest:
            rest[k] = dequantize_tensor(rest[k], fdtype).to(rest[k].qdata.device)
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not any(k.startswith(n + ".") for n in built)]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"{source}: tensors do not fit the model: missing {missing[:5]} ({len(missing)}), "
                              f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})")
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} parameter(s) not loaded, e.g. {left[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_linears(model, source=source)
    return model.eval()


def prepare_linears(model: nn.Module, dtype: torch.dtype | None = None, source: str = "model") -> dict:
    """Prepare every `QuantizedLinear` of the model for its device and `dtype` (default: the model's dtype),
    log the routes once (INFO; WARNING when some linear falls back to a dense dequantized weight) and return
    `routes(model)`."""
    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.prepare(dtype)
    r = routes(model)
    floats = f"; {r['float']} float linears: {r['float_route']}" if r["float"] else ""
    if r["quantized"]:
        level = logging.WARNING if r["dense_fallback_bytes"] else logging.INFO
        log.log(level, "fishlab: %s: %s linears on %s, %s activations: %s%s%s", source, r["quantized"], r["device"],
                r["dtype"], ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())),
                f" (dense fallback holds {r['dense_fallback_bytes'] / 2**20:.1f} MiB of dequantized weights)"
                if r["dense_fallback_bytes"] else "", floats)
    elif r["float"]:
        log.info("fishlab: %s: %s float linears on %s, %s: %s", source, r["float"], r["device"], r["dtype"],
                 r["float_route"])
    return r


def routes(model: nn.Module) -> dict:
    """How the model's linears run, for reports: {"counts": {route: n} over quantized linears, "linears":
    {name: route} (plain nn.Linear = "float"), "quantized": n, "float": n, "dense_fallback_bytes": bytes of
    weights held dequantized because no kernel fits (the memory the fallback costs), "float_route" (how the
    float linears run: fishlab's bf16 GEMV for decoding on the CPU, or F.linear), "cpu_kernels" (fishlab's own
    CPU kernels: their instruction set, or why they are off), "device", "dtype"}."""
    per = {}
    dense = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            per[name] = m.route_name or "unprepared"
            if m.w_dense is not None:
                dense += m.w_dense.numel() * m.w_dense.element_size()
        elif isinstance(m, nn.Linear):
            per[name] = "float"
    counts = Counter(v for v in per.values() if v != "float")
    dev = getattr(model, "device", None)
    dt = getattr(model, "dtype", None)
    gemv = (str(dev) == "cpu" and dt == torch.bfloat16 and cgemv.available()
            and any(isinstance(m, Linear) for m in model.modules()))
    return {"counts": dict(counts), "linears": per, "quantized": sum(counts.values()),
            "float": sum(1 for v in per.values() if v == "float"), "dense_fallback_bytes": dense,
            "float_route": f"bf16_gemv up to {cgemv.MAX_ROWS} rows, else F.linear" if gemv else "F.linear",
            "cpu_kernels": cgemv.isa() if cgemv.available() else f"off ({cgemv.reason()})",
            "device": str(dev) if dev is not None else None,
            "dtype": str(dt).replace("torch.", "") if dt is not None else None}


def is_quantized_checkpoint(ckpt_dir: str | Path) -> bool:
    """True when the directory holds a fishlab quantized checkpoint (a quantization.json)."""
    from ..quant.apply import read_quantization
    return read_quantization(ckpt_dir) is not None


def load_transformer(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                     ) -> DualARTransformer | TextLM:
    """config.json + weights (index + shards, or model.safetensors) -> DualARTransformer (or `TextLM` for a
    fishlab text-LM checkpoint) in eval mode.

    dtype=None uses the config's dtype (bfloat16 for S2 Pro, float32 for the golden sets). Strict: the
    checkpoint must hold exactly the manifest's tensors with the manifest's shapes, else `CheckpointError`.
    A fishlab quantized checkpoint (quantization.json present) is detected and loaded with its quantized
    linears kept packed (`load_quantized_transformer`).
    """
    if is_quantized_checkpoint(ckpt_dir):
        return load_quantized_transformer(ckpt_dir, device, dtype)
    cfg = load_transformer_config(ckpt_dir)
    dtype = dtype or TORCH_DTYPES[cfg.dtype]
    hf = load_transformer_state_dict(ckpt_dir, cfg, device=device, dtype=dtype)
    tensors = {hf_to_internal(k): hf.pop(k) for k in list(hf)}
    return build_transformer(cfg, tensors, linear_from_tensors, source=str(ckpt_dir), consume=True)


def load_quantized_transformer(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                               dtype: torch.dtype | None = None) -> DualARTransformer | TextLM:
    """A fishlab quantized checkpoint -> DualARTransformer whose quantized linears are `QuantizedLinear`s.

    Packed data and scales stay as stored (moved to `device`); every other float tensor is cast to `dtype`
    (None: the config's dtype). Errors in the checkpoint (missing or extra tensors, a description that does
    not match the stored tensors or the shard metadata, a wrong format version) are `CheckpointError`s that
    name the directory.
    """
    from ..quant.apply import load_quantized_tensors
    cfg = load_transformer_config(ckpt_dir)
    dtype = dtype or TORCH_DTYPES[cfg.dtype]
    try:
        hf, _ = load_quantized_tensors(ckpt_dir)
    except CheckpointError as e:
        raise e if str(ckpt_dir) in str(e) else CheckpointError(f"{ckpt_dir}: {e}") from None
    except (QuantError, SchemeError) as e:
        raise CheckpointError(f"{ckpt_dir}: quantized tensor does not match its description: {e}") from None
    tensors: dict[str, Tensor | QTensor] = {}
    for k in list(hf):
        v = hf.pop(k)
        if isinstance(v, QTensor):
            v = v.to(device)
        else:
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        tensors[hf_to_internal(k)] = v
    return build_transformer(cfg, tensors, linear_from_tensors, source=str(ckpt_dir), consume=True)


def _component(name: str) -> str:
    """Manifest component of an internal parameter / buffer name."""
    parts = name.split(".")
    if "norm" in (parts[-2] if len(parts) > 1 else parts[0]):
        return "norms"
    if name.startswith("layers."):
        return "slow_ar"
    if name.startswith(("fast_layers.", "fast_output.", "fast_project_in.")):
        return "fast_ar"
    return "embeddings"


def model_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights hold in memory: every parameter and every buffer (packed data, scales,
    biases, kernel operands, dense fallback weights), KV caches excluded, each storage counted once. Returns
    {"slow_ar", "fast_ar", "embeddings", "norms", "total"} (the manifest's component names), plus
    "quantized_linears" (bytes held by `QuantizedLinear` modules, all of them), "dense_fallback" (the part of
    those that is dequantized weights of the dense route) and "float_linears" (bytes of plain linear weights)."""
    out = dict.fromkeys(("slow_ar", "fast_ar", "embeddings", "norms"), 0)
    out.update(quantized_linears=0, dense_fallback=0, float_linears=0)
    seen: set = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, KVCache):
            continue
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for tname, t in tensors:
            if t is None or t.is_meta:
                continue
            key = (t.device, t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
            if key in seen:
                continue
            seen.add(key)
            n = t.numel() * t.element_size()
            full = f"{mod_name}.{tname}" if mod_name else tname
            out[_component(full)] += n
            if isinstance(mod, QuantizedLinear):
                out["quantized_linears"] += n
                if tname == "w_dense":
                    out["dense_fallback"] += n
            elif isinstance(mod, nn.Linear):
                out["float_linears"] += n
    out["total"] = sum(out[k] for k in ("slow_ar", "fast_ar", "embeddings", "norms"))
    return out
