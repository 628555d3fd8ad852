"""Build a DualAR model from a checkpoint directory in the real HF layout (transformer part).

Reading and strict validation are `fishlab.checkpoint`'s job (`load_transformer_state_dict`: the index's shards
or a single model.safetensors, checked name by name and shape by shape against the manifest, one
`CheckpointError` naming the files and the first few missing / unexpected / wrong-shape tensors with counts).
This module maps HF names to internal names (`fishlab.manifest.hf_to_internal`) and assembles the model.

Quantization seam: every linear layer is built by ONE function, `linear_from_tensors(name, tensors)`, which
gets the internal module name (e.g. `layers.3.attention.wqkv`) and that module's tensors with the module
prefix stripped (for a plain checkpoint `{"weight": W}`). A quantized checkpoint passes its own function
(e.g. one that turns `{"qweight": ..., "scales": ...}` into a packed linear module) and its own tensors via
`build_transformer`; nothing else changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import CheckpointError, load_transformer_state_dict
from ..config import DualARConfig, load_transformer_config
from ..manifest import hf_to_internal
from .dualar import TORCH_DTYPES, DualARTransformer, linear_names, replace_linears

__all__ = ["CheckpointError", "LinearFactory", "linear_from_tensors", "build_transformer", "load_transformer"]

LinearFactory = Callable[[str, "dict[str, Tensor]"], nn.Module]


def linear_from_tensors(name: str, tensors: dict[str, Tensor]) -> nn.Module:
    """The default (unquantized) linear: tensors = {"weight": W [out, in]} -> nn.Linear without bias."""
    if set(tensors) != {"weight"}:
        raise CheckpointError(f"linear {name!r}: expected exactly a 'weight' tensor, got {sorted(tensors)}")
    w = tensors["weight"]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def build_transformer(cfg: DualARConfig, tensors: dict[str, Tensor],
                      linear_factory: LinearFactory = linear_from_tensors, source: str = "checkpoint"
                      ) -> DualARTransformer:
    """Assemble a model from {internal name: tensor} (already on the target device and dtype).

    Linear modules come from `linear_factory(module_name, {suffix: tensor})`; everything else (embeddings,
    norms) is assigned strictly by parameter name. Any tensor left over, or any parameter left unset, is a
    `CheckpointError` naming `source`.
    """
    with torch.device("meta"):
        model = DualARTransformer(cfg)
    rest = dict(tensors)
    expected_shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def make(name: str, old: nn.Linear) -> nn.Module:
        prefix = name + "."
        group = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
        if not group:
            raise CheckpointError(f"{source}: no tensors for linear {name!r}")
        if set(group) == {"weight"} and tuple(group["weight"].shape) != expected_shapes[name]:
            raise CheckpointError(f"{source}: {name}.weight has shape {list(group['weight'].shape)}, "
                                  f"expected {list(expected_shapes[name])}")
        return linear_factory(name, group)

    built = replace_linears(model, make, names=linear_names(model))
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
    return model.eval()


def load_transformer(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                     ) -> DualARTransformer:
    """config.json + weights (index + shards, or model.safetensors) -> DualARTransformer in eval mode.

    dtype=None uses the config's dtype (bfloat16 for S2 Pro, float32 for the golden sets). Strict: the
    checkpoint must hold exactly the manifest's tensors with the manifest's shapes, else `CheckpointError`.
    """
    cfg = load_transformer_config(ckpt_dir)
    dtype = dtype or TORCH_DTYPES[cfg.dtype]
    hf = load_transformer_state_dict(ckpt_dir, cfg, device=device, dtype=dtype)
    tensors = {hf_to_internal(k): v for k, v in hf.items()}
    return build_transformer(cfg, tensors, linear_from_tensors, source=str(ckpt_dir))
