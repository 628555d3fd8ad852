"""Reader: a GPTQ weight-only checkpoint in the common layout (AutoGPTQ / GPTQModel, e.g. a w4a16 g32
desc_act S2 Pro; docs/imports.md), safetensors with, per quantized linear X (its weight [out, in]):

- `X.qweight` int32 [in * bits / 32, out]: the codes along the INPUT dim, 32/bits per word, lowest bits first;
- `X.qzeros`  int32 [groups, out * bits / 32]: zero points along the OUTPUT dim, same packing;
- `X.scales`  float16 [groups, out];
- `X.g_idx`   int32 [in]: the group of each input feature (a permutation of groups with act-order /
  desc_act; i // group_size without it; may be absent then).

W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o], where the stored zero is z - 1 in checkpoint_format
"gptq" (v1) and z itself in "gptq_v2". bits, group_size, desc_act, sym and checkpoint_format come from
quantize_config.json or config.json's quantization_config. Some tools write v2 zeros under "gptq": for a
symmetric checkpoint the stored zeros tell (2^(bits-1) - 1 in v1, 2^(bits-1) in v2), and the reader follows
them and says so. Every other tensor is read as stored.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import spec
from ..checkpoint import TensorInfo, read_tensor
from ..config import ModelConfig
from ..manifest import transformer_manifest
from . import Source, SourceError, hf_names
from .folder import folder_codec, weight_infos

PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
QUANTIZE_CONFIG = "quantize_config.json"


def quantize_config(path: Path) -> tuple[dict, str]:
    """The GPTQ settings and the file they came from."""
    d = path if path.is_dir() else path.parent
    for f, pick in ((d / QUANTIZE_CONFIG, lambda j: j), (d / spec.CONFIG_FILE, lambda j: j.get("quantization_config"))):
        if f.is_file():
            q = pick(json.loads(f.read_text()))
            if q:
                method = q.get("quant_method", "gptq")
                if method != "gptq":
                    raise SourceError(f"{f}: quant_method is {method!r}, not gptq")
                return q, str(f)
    raise SourceError(f"{d}: no {QUANTIZE_CONFIG} and no quantization_config in {spec.CONFIG_FILE}: the GPTQ "
                      f"bits / group_size / desc_act are unknown")


def unpack_int32(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The 32/bits unsigned values of each int32 word, lowest bits first, laid out along `dim` (0 or 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        return ((x.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, x.shape[1])
    return ((x.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(x.shape[0], -1)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v2_zeros: bool, out_features: int,
                    in_features: int) -> torch.Tensor:
    """W [out, in] in float32 from the four GPTQ tensors (see the module docstring)."""
    q = unpack_int32(qweight, bits, 0)[:in_features]              # [in, out]
    z = unpack_int32(qzeros, bits, 1)[:, :out_features]           # [groups, out]
    if not v2_zeros:
        z = z + 1
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).t().contiguous()


def open_gptq(path: Path, cfg: ModelConfig) -> Source:
    qc, qc_file = quantize_config(path)
    bits = int(qc.get("bits", 4))
    if 32 % bits:
        raise SourceError(f"{qc_file}: bits {bits} do not pack evenly into int32 words; fishlab reads 2, 4 and 8")
    group = int(qc.get("group_size", 128))
    desc_act = bool(qc.get("desc_act", False))
    sym = bool(qc.get("sym", True))
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise SourceError(f"{qc_file}: checkpoint_format {fmt!r}; fishlab reads gptq and gptq_v2")
    infos, weights = weight_infos(path)
    to_hf = hf_names(cfg.transformer)
    shapes = {s.name: tuple(s.shape) for s in transformer_manifest(cfg.transformer)}
    plain: dict[str, TensorInfo] = {}
    packed: dict[str, dict[str, TensorInfo]] = {}
    unknown = []
    for name, info in infos.items():
        base, _, part = name.rpartition(".")
        if part in PARTS and base + ".weight" in to_hf:
            packed.setdefault(to_hf[base + ".weight"], {})[part] = info
        elif name in to_hf:
            plain[to_hf[name]] = info
        else:
            unknown.append(name)
    if unknown:
        raise SourceError(f"{path}: {len(unknown)} tensor(s) that are not S2 Pro tensors of the base config nor "
                          f"GPTQ parts ({', '.join(PARTS)}), e.g. {', '.join(sorted(unknown)[:5])}")
    label = f"gptq int{bits} g{group}{' act-order' if desc_act else ''} {'sym' if sym else 'asym'}"
    stored, nbytes = {}, {}
    for hf, parts in packed.items():
        if hf in plain:
            raise SourceError(f"{path}: {hf} is stored both plain and GPTQ-packed")
        if "bias" in parts:
            raise SourceError(f"{path}: {parts['bias'].name}: S2 Pro's linears have no bias")
        for need in ("qweight", "qzeros", "scales"):
            if need not in parts:
                raise SourceError(f"{path}: {hf} has {', '.join(sorted(parts))} but no {need}")
        out_f, in_f = shapes[hf]
        groups = 1 if group <= 0 else math.ceil(in_f / group)
        want = {"qweight": (in_f * bits // 32, out_f), "qzeros": (groups, out_f * bits // 32),
                "scales": (groups, out_f), "g_idx": (in_f,)}
        for part, info in parts.items():
            if tuple(info.shape) != want[part]:
                raise SourceError(f"{path}: {info.name} is {list(info.shape)}, expected {list(want[part])} for "
                                  f"{hf} {[out_f, in_f]} at {bits} bits, group size {group}")
        stored[hf] = label
        nbytes[hf] = sum(i.nbytes for i in parts.values())
    for hf, info in plain.items():
        stored[hf] = info.dtype
        nbytes[hf] = info.nbytes
    notes = [f"{len(packed)} GPTQ-packed linears ({label}, checkpoint_format {fmt}, from {Path(qc_file).name}); "
             f"{len(plain)} tensors as stored"]
    v2_zero = 1 << (bits - 1)
    said: set[str] = set()

    def get(hf: str) -> torch.Tensor:
        if hf in plain:
            return read_tensor(plain[hf]).float()
        p = {k: read_tensor(v) for k, v in packed[hf].items()}
        out_f, in_f = shapes[hf]
        g_idx = p.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(in_f, dtype=torch.int32) // (group if group > 0 else in_f)
        v2 = fmt == "gptq_v2"
        if sym and not v2 and bool((unpack_int32(p["qzeros"], bits, 1) == v2_zero).all()):
            v2 = True
            if not said:
                said.add("v2")
                notes.append(f"zero points are stored as {v2_zero} (the gptq_v2 convention) although "
                             f"checkpoint_format is {fmt!r}: read as v2 (symmetric, so the stored zeros tell)")
        return dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], g_idx, bits, v2, out_f, in_f)

    codec, codec_bytes, other, codec_note = folder_codec(path, weights)
    notes.append(codec_note)
    return Source("gptq", path, stored, nbytes, set(packed), get, codec, codec_bytes=codec_bytes,
                  other_bytes=other, notes=notes)
