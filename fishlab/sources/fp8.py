"""Reader: an FP8 weight-only checkpoint as drbaph/s2-pro-fp8 publishes it (docs/imports.md): safetensors in
which each quantized linear `X.weight` is float8_e4m3fn beside `X.weight.scale`, float32 of shape
[out_features, 1] (one scale per output row), so W = float(X.weight) * X.weight.scale; every other tensor
stored as is (bfloat16); `_buf.*` entries are module buffers (RoPE tables, masks) and are dropped. Names may
be the HF ones (`text_model.model.layers.0...`) or the internal fish-speech ones (`layers.0...`,
`fast_layers...`): both are accepted. A `codec.pth` beside the weights is the codec as shipped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import TensorInfo, read_tensor
from ..config import ModelConfig
from . import Source, SourceError, hf_names
from .folder import folder_codec, weight_infos

SCALE_SUFFIX = ".scale"
BUFFER_PREFIX = "_buf."
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def open_fp8(path: Path, cfg: ModelConfig) -> Source:
    infos, weights = weight_infos(path)
    to_hf = hf_names(cfg.transformer)
    found: dict[str, TensorInfo] = {}
    scales: dict[str, TensorInfo] = {}
    dropped, unknown = [], []
    for name, info in infos.items():
        if name.startswith(BUFFER_PREFIX):
            dropped.append(name)
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in to_hf:
            scales[to_hf[name[: -len(SCALE_SUFFIX)]]] = info
        elif name in to_hf:
            if to_hf[name] in found:
                raise SourceError(f"{path}: tensor {to_hf[name]} is stored twice (as {found[to_hf[name]].name} "
                                  f"and {name})")
            found[to_hf[name]] = info
        else:
            unknown.append(name)
    if unknown:
        raise SourceError(f"{path}: {len(unknown)} tensor(s) that are neither S2 Pro tensors of the base config, "
                          f"their '.scale' nor '_buf.' buffers, e.g. {', '.join(sorted(unknown)[:5])}")
    stored, nbytes, quantized = {}, {}, set()
    for hf, info in found.items():
        if info.dtype in FP8_DTYPES:
            sc = scales.get(hf)
            if sc is None:
                raise SourceError(f"{path}: {info.name} is {info.dtype} but has no {info.name}{SCALE_SUFFIX}")
            if tuple(sc.shape) not in ((info.shape[0], 1), (info.shape[0],)):
                raise SourceError(f"{path}: {sc.name} is {list(sc.shape)}, expected [{info.shape[0]}, 1] "
                                  f"(one scale per output row of {info.name} {list(info.shape)})")
            stored[hf] = f"{info.dtype}, {sc.dtype} row scale"
            nbytes[hf] = info.nbytes + sc.nbytes
            quantized.add(hf)
        else:
            if hf in scales:
                raise SourceError(f"{path}: {scales[hf].name} scales {info.name}, which is {info.dtype}, not FP8")
            stored[hf] = info.dtype
            nbytes[hf] = info.nbytes

    def get(hf: str) -> torch.Tensor:
        info = found[hf]
        w = read_tensor(info)
        if hf in quantized:
            s = read_tensor(scales[hf]).float().reshape(-1, 1)
            return w.float().mul_(s)
        return w.float()

    codec, codec_bytes, other, codec_note = folder_codec(path, weights)
    notes = [f"{len(quantized)} FP8 tensors with row scales; {len(found) - len(quantized)} stored as "
             f"{', '.join(sorted({i.dtype for h, i in found.items() if h not in quantized})) or '-'}"]
    if dropped:
        notes.append(f"dropped {len(dropped)} '_buf.' buffer(s) ({', '.join(sorted(dropped)[:3])}...)")
    notes.append(codec_note)
    return Source("fp8", path, stored, nbytes, quantized, get, codec, codec_bytes=codec_bytes, other_bytes=other,
                  notes=notes)

