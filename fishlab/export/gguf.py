"""`fishlab export-gguf`: a plain S2 Pro checkpoint as ONE GGUF file in the layout s2.cpp loads
(`fishlab.gguf_layout`, ../shared/spec/gguf-s2cpp.md), written with gguf-py's `GGUFWriter`.

    export_gguf("ckpt/", "s2-pro-q8_0.gguf", "q8_0")        # every 2-D transformer tensor Q8_0
    export_gguf("ckpt/", "s2-pro-1b.gguf", phase=phase_1b)  # the phase's target linears Q4_0, the rest F16

Streaming: the plan (every tensor's name, shape, type, bytes) is known from the headers, so GGUFWriter writes
the header, the keys and the tensor-info table first; then each tensor's bytes are produced block by block of
rows (`checkpoint.iter_row_blocks`: plain reads into one reused buffer) and appended with gguf-py's padding.
gguf-py's own `write_tensor_data` takes each tensor as one whole array, which would hold the 0.8 GB token table
twice; writing the blocks ourselves keeps one block in memory. The codec is read from its memory-mapped
codec.pth tensor by tensor. The file appears under its name only when complete (`io.atomic_path`); the input
is never modified.
"""
from __future__ import annotations

import ctypes
import mmap
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .. import __version__, gguf_layout as L, spec
from ..checkpoint import TensorInfo, iter_row_blocks, validate_transformer
from ..config import load_config
from ..demo import is_synthetic
from ..io import atomic_path
from ..manifest import transformer_manifest
from ..model.codec import weight_norm
from ..model.codec_load import check_codec_state_dict, find_codec_file, read_codec_file
from ..quant.apply import read_quantization

BLOCK_ELEMS = 1 << 22      # values per block of rows (16 MB of float32 while quantizing)


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the file, tensor or option."""


@dataclass(frozen=True)
class Planned:
    name: str                       # the GGUF tensor name
    shape: tuple                    # numpy order (GGUF stores it reversed)
    type: T
    nbytes: int
    source: str                     # where it comes from (HF or codec.pth name)
    produce: Callable[[], Iterator[np.ndarray]]   # the tensor's bytes, block by block, in order
    note: str | None = None         # why it is not the asked type


def _convert(block: torch.Tensor, t: T, name: str) -> np.ndarray:
    """One block of rows in GGUF type t, as a numpy array of its bytes' dtype."""
    if t == T.F32:
        return block.float().numpy()
    if t == T.F16:
        out = block.to(torch.float16)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(block).all()):
            raise ExportError(f"tensor {name}: values beyond float16's range (max |w| "
                              f"{float(block.abs().max()):.4g}); export it with --type f32 or bf16")
        return out.numpy()
    if t == T.BF16:
        return block.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(block.float().numpy(), t)


def _transformer_blocks(info: TensorInfo, t: T, name: str) -> Callable[[], Iterator[np.ndarray]]:
    def produce():
        for block in iter_row_blocks(info, BLOCK_ELEMS):
            yield _convert(block, t, name)
    return produce


def _codec_blocks(sd: dict, ct: L.CodecTensor, t: T, mapped: bool) -> Callable[[], Iterator[np.ndarray]]:
    def produce():
        src = [sd[n].float() for n in ct.sources]
        w = weight_norm(*src) if ct.folded else src[0]
        yield _convert(w, t, ct.gguf_name)
        if mapped:
            for n in ct.sources:
                _drop_mapped_pages(sd[n])
    return produce


def _drop_mapped_pages(x: torch.Tensor) -> None:
    """Let the pages of a tensor memory-mapped from codec.pth (`read_codec_file` maps a zip checkpoint) leave
    this process's RSS once it is written: madvise DONTNEED on a private file mapping drops the pages (they
    stay in the page cache; reading again re-faults the file's bytes), so the 1.6 GB codec does not
    accumulate in RSS. Never called on anonymous memory, where DONTNEED would zero it."""
    if not sys.platform.startswith("linux"):
        return
    st = x.untyped_storage()
    page = mmap.PAGESIZE
    start = st.data_ptr() // page * page
    end = -(-(st.data_ptr() + st.nbytes()) // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(mmap.MADV_DONTNEED))


def plan_export(ckpt: Path, type_name: str = "f16", phase=None) -> tuple[list[Planned], dict]:
    """Every tensor of the GGUF (transformer, then codec) with its type and byte producer, plus the facts
    the header and the report need. Reads headers only (the codec file is memory-mapped)."""
    if read_quantization(ckpt) is not None:
        raise ExportError(f"{ckpt} is a fishlab quantized checkpoint; export from the plain checkpoint it came "
                          f"from, with --phase to map the phase to its GGUF type")
    cfg = load_config(ckpt)
    cfg_t, infos = validate_transformer(ckpt, cfg.transformer)
    mapping = None
    if phase is not None:
        type_name, mapping = L.phase_type(phase)
    if type_name not in L.TYPES:
        raise ExportError(f"unknown GGUF type {type_name!r}; fishlab writes: {', '.join(L.TYPES)}")
    wanted = L.TYPES[type_name]
    targets = L.phase_targets(cfg_t, phase) if phase is not None else None

    plan: list[Planned] = []
    for s in transformer_manifest(cfg_t):
        t, why = L.transformer_type(s, wanted, targets)
        name = L.transformer_name(s.name)
        plan.append(Planned(name, tuple(s.shape), t, L.type_nbytes(t, s.shape), s.name,
                            _transformer_blocks(infos[s.name], t, name), why))
    codec_file = find_codec_file(ckpt)
    sd = check_codec_state_dict(read_codec_file(codec_file), cfg.codec, codec_file)
    mapped = zipfile.is_zipfile(codec_file)          # read_codec_file memory-maps exactly these
    for ct in L.codec_tensors(cfg.codec):
        t = L.codec_type(ct)
        plan.append(Planned(ct.gguf_name, ct.shape, t, L.type_nbytes(t, ct.shape), " + ".join(ct.sources),
                            _codec_blocks(sd, ct, t, mapped)))
    notes = []
    if mapping:
        notes.append(f"phase {phase.name}: {mapping}; its other 2-D tensors F16, norms F32"
                     + (f" (its {phase.scale_dtype} scales become GGUF's f16 block scales)"
                        if phase.scale_dtype != "float16" else ""))
    if not L.is_s2pro_codec(cfg.codec):
        notes.append("the codec is not S2 Pro's geometry: s2.cpp will not load this file (it supports only "
                     "the S2 Pro codec)")
    if is_synthetic(ckpt):
        notes.append("SYNTHETIC weights (fishlab's demo checkpoint)")
    facts = {"cfg": cfg, "type": type_name, "wanted": wanted, "phase": phase.name if phase else None,
             "mapping": mapping, "notes": notes, "codec_file": str(codec_file)}
    return plan, facts


def _add_header(w: gguf.GGUFWriter, ckpt: Path, facts: dict) -> None:
    cfg = facts["cfg"]
    w.add_name(f"{ckpt.name} {facts['type'].upper()}")
    w.add_basename(ckpt.name)
    what = f"phase {facts['phase']} ({facts['mapping']})" if facts["phase"] else facts["type"].upper()
    w.add_description(f"Fish Audio S2 Pro DualAR + codec, {what}; exported by fishlab {__version__}"
                      + ("; SYNTHETIC weights" if is_synthetic(ckpt) else ""))
    w.add_file_type(int(L.FILE_TYPES[facts["wanted"]]))
    if facts["wanted"] not in L.FLOAT_TYPES:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype in L.transformer_keys(cfg.transformer) + L.codec_keys(cfg.codec):
        w.add_key_value(key, value, vtype)


def export_gguf(ckpt: str | Path, out: str | Path, type_name: str | None = None, phase=None,
                overwrite: bool = False, progress: bool = False) -> dict:
    """Write the GGUF of checkpoint `ckpt` to `out` (atomically). `type_name` (default f16) or `phase` (mapped
    to its nearest GGUF type; `gguf_layout.NoGGUFEquivalent` when it has none). Returns what was written."""
    ckpt, out = Path(ckpt).resolve(), Path(out).resolve()
    if type_name is not None and phase is not None:
        raise ExportError("give either a GGUF type or a phase, not both")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out == ckpt or ckpt in out.parents:
        raise ExportError(f"output {out} must not be inside the input checkpoint {ckpt}")
    plan, facts = plan_export(ckpt, type_name or "f16", phase)
    total = sum(p.nbytes for p in plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total > free:
        raise ExportError(f"not enough free space for {out}: need about {total / 1e9:.2f} GB, {free / 1e9:.2f} GB free")

    w = gguf.GGUFWriter(path=None, arch=spec.GGUF_ARCH)
    _add_header(w, ckpt, facts)
    for p in plan:     # any non-uint8 numpy dtype: the shape given is the element shape, the type raw_dtype
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.type)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"export {facts['type']}", leave=False)
    t0 = time.perf_counter()
    try:
        with atomic_path(out) as tmp:
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                f = w.fout[0]
                for p in plan:
                    w.write_padding(f, f.tell())            # what write_tensor_data does, block by block
                    n = 0
                    for block in p.produce():
                        b = np.ascontiguousarray(block).view(np.uint8)
                        f.write(b.data)
                        n += b.nbytes
                    if n != p.nbytes:
                        raise ExportError(f"tensor {p.name} ({p.source}): produced {n} bytes for "
                                          f"{list(p.shape)} {p.type.name}, expected {p.nbytes}")
                    w.write_padding(f, n)
                    if bar:
                        bar.update(n)
            finally:
                w.close()
    finally:
        if bar:
            bar.close()
    types: dict[str, int] = {}
    for p in plan:
        types[p.type.name] = types.get(p.type.name, 0) + 1
    return {"path": str(out), "bytes": out.stat().st_size, "type": facts["type"], "phase": facts["phase"],
            "mapping": facts["mapping"], "tensors": len(plan), "types": types,
            "fallbacks": {p.name: p.note for p in plan if p.note}, "notes": facts["notes"],
            "seconds": time.perf_counter() - t0, "source": str(ckpt)}

