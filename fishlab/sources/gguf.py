"""Reader: a GGUF of S2 Pro in the single-file layout s2.cpp loads (`fishlab.gguf_layout`; e.g. the
community q2_k..q8_0 files), any tensor type gguf-py dequantizes (K- and I-quants included).

The header's transformer keys must agree with the base checkpoint's config (they name the same model); the
transformer tensors are found by their s2.cpp names, dequantized by `gguf.quants.dequantize` from the
memory-mapped file. A file with a codec section gives the codec back in codec.pth form: each folded
`X.weight` becomes g = ||W|| (over every dim but 0) and v = W, so g * v / ||v|| is W again.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from .. import gguf_layout as L, spec
from ..config import ModelConfig
from ..manifest import transformer_manifest
from . import Source, SourceError

_FLOATS = ("F32", "F16", "BF16", "F64")


def _header(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items()}


def open_gguf(path: Path, cfg: ModelConfig) -> Source:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: not a file (a GGUF import is one .gguf file)")
    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SourceError(f"{path}: not a readable GGUF file ({e})") from None
    h = _header(r)
    if h.get("general.architecture") != spec.GGUF_ARCH:
        raise SourceError(f"{path}: general.architecture is {h.get('general.architecture')!r}, "
                          f"expected {spec.GGUF_ARCH!r} (the s2.cpp layout)")
    wrong = []
    for key, want, vtype in L.transformer_keys(cfg.transformer):
        got = h.get(key)
        if got is None:
            continue         # a key the exporter that wrote it did not write; the tensors' shapes still must fit
        same = abs(got - want) <= 1e-6 * abs(want) if vtype == gguf.GGUFValueType.FLOAT32 else got == want
        if not same:
            wrong.append(f"{key} = {got!r} (the base config says {want!r})")
    if wrong:
        raise SourceError(f"{path}: the GGUF header describes another model than the base checkpoint: "
                          + "; ".join(wrong[:5]))
    tensors = {t.name: t for t in r.tensors}

    def shape(t) -> tuple:
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    stored, nbytes, quantized, by_hf = {}, {}, set(), {}
    for s in transformer_manifest(cfg.transformer):
        t = tensors.get(L.transformer_name(s.name))
        if t is None:
            continue
        if shape(t) != tuple(s.shape):
            raise SourceError(f"{path}: tensor {t.name} is {list(shape(t))}, the base config needs {list(s.shape)}")
        by_hf[s.name] = t
        stored[s.name] = t.tensor_type.name
        nbytes[s.name] = int(t.n_bytes)
        if t.tensor_type.name not in _FLOATS:
            quantized.add(s.name)
    cts = L.codec_tensors(cfg.codec)
    codec_names = {ct.gguf_name for ct in cts}
    unexpected = [n for n in tensors if n not in codec_names and n not in {L.transformer_name(k) for k in by_hf}]
    if unexpected:
        raise SourceError(f"{path}: {len(unexpected)} tensor(s) that the base config does not have, e.g. "
                          f"{', '.join(unexpected[:5])}")
    have_codec = [n for n in codec_names if n in tensors]
    if have_codec and len(have_codec) != len(codec_names):
        raise SourceError(f"{path}: the codec section is incomplete or of another geometry than the base "
                          f"checkpoint's codec ({len(have_codec)} of {len(codec_names)} tensors)")

    def values(t) -> torch.Tensor:
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)      # F32 comes back as the file's mapping
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=not x.flags.writeable).reshape(shape(t)))

    def codec():
        if not have_codec:
            return None
        sd = {}
        for ct in cts:
            w = values(tensors[ct.gguf_name])
            if tuple(w.shape) != tuple(ct.shape):
                raise SourceError(f"{path}: codec tensor {ct.gguf_name} is {list(w.shape)}, expected {list(ct.shape)}")
            if ct.folded:
                g = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
                sd[ct.sources[0]], sd[ct.sources[1]] = g, w
            else:
                sd[ct.sources[0]] = w
        return sd

    kinds = sorted(set(stored.values()))
    notes = [f"GGUF tensor types of the transformer: {', '.join(kinds)}"]
    if have_codec:
        notes.append("codec from the file: weight norm unfolded (g = ||W||, v = W)")
    return Source("gguf", path, stored, nbytes, quantized, lambda n: values(by_hf[n]), codec,
                  codec_bytes=sum(int(tensors[n].n_bytes) for n in have_codec), other_bytes=0, notes=notes)
