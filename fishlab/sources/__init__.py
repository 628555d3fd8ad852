"""Sources: published quantizations of S2 Pro read into fishlab's checkpoint vocabulary, so the reports put
them on the same yardstick as fishlab's own phases.

An import is data like a phase: a params file with `phase:` (its name), `source: gguf | fp8 | gptq` and
`path:` (the downloaded file or folder). One reader per format (`gguf.py`, `fp8.py`, `gptq.py`) opens the
file and answers, for each HF tensor name of the config's manifest: how the file stores it, its bytes there,
and the tensor dequantized to float32; plus the codec when the file carries one. Formats and naming:
docs/imports.md.

`import_checkpoint` is the one applier: it writes a plain fishlab-layout checkpoint directory (config,
tokenizer and the other small files from the bf16 base checkpoint; the file's codec when it has one, else
the base's; every transformer tensor dequantized, in the dtype the reports run the model in) with
`import.json` (what the original is, its size on disk) and the per-tensor weight error against the base in
the same file a phase output has. `workbook.run_phase` returns it in place of a quantized checkpoint when the
phase is an ImportPhase, so sizes, errors, samples, KL and speaker similarity are measured the same way.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import spec
from ..checkpoint import (CheckpointError, OutTensor, iter_row_blocks, transformer_files, tree_bytes,
                          validate_transformer, write_sharded)
from ..config import ModelConfig, load_config, preset
from ..io import atomic_dir, write_json_atomic
from ..manifest import TensorSpec, codec_manifest, transformer_manifest
from ..metrics import summarize
from ..model.codec_load import check_codec_state_dict, write_codec_pth
from ..sizes import Estimate, estimate

FORMATS = ("gguf", "fp8", "gptq")
IMPORT_FILE = "import.json"
FORMAT_VERSION = 1


class SourceError(CheckpointError):
    """A file that cannot be imported as its params file says; the message names the file and the tensor."""


@dataclass(frozen=True)
class ImportPhase:
    name: str
    format: str                 # the params file's `source:` (gguf | fp8 | gptq)
    path: str                   # the published file or folder
    description: str = ""
    source: str = ""            # the params file it came from (as Phase.source)

    @property
    def label(self) -> str:
        return f"{self.name} {self.format.upper()} import"

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_path(self) -> Path:
        p = Path(self.path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{self.source}: import {self.name!r}: {self.format} path not found: {p} "
                                    f"(download it, or point `path:` at it)")
        return p.resolve()

    @classmethod
    def from_dict(cls, d: dict, source: str = "phase") -> "ImportPhase":
        from ..phases import PhaseError
        fmt, path = d.get("source"), d.get("path")
        if fmt not in FORMATS:
            raise PhaseError(f"{source}: source must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not isinstance(path, str) or not path:
            raise PhaseError(f"{source}: an import needs `path:` (the {fmt} file or folder), got {path!r}")
        return cls(name=str(d["phase"]), format=fmt, path=path, description=str(d.get("description") or ""),
                   source=source)


@dataclass
class Source:
    """An opened published file. `stored[name]` says how the file holds each HF tensor (e.g. "Q4_K",
    "float8_e4m3fn, float32 row scale", "gptq int4 g32 act-order", "bfloat16"), `stored_bytes[name]` its bytes
    there; `quantized` the names stored lossily (their weight error is measured); `get(name)` the float32
    tensor; `codec()` the codec state dict (codec.pth names, float32) when the file carries one, else None."""
    format: str
    path: Path
    stored: dict[str, str]
    stored_bytes: dict[str, int]
    quantized: set[str]
    get: Callable[[str], torch.Tensor]
    codec: Callable[[], dict | None]
    codec_bytes: int = 0                       # the codec's bytes in the published files (0: none there)
    other_bytes: int = 0                       # bytes of files besides the tensors (configs, tokenizer, ...)
    notes: list[str] = field(default_factory=list)


def hf_names(cfg_t) -> dict[str, str]:
    """{name as a file may spell it: HF name}: the HF names and the internal (fish-speech) ones."""
    specs = transformer_manifest(cfg_t)
    return {**{s.internal: s.name for s in specs}, **{s.name: s.name for s in specs}}


def open_source(fmt: str, path: Path, cfg: ModelConfig) -> Source:
    if fmt == "gguf":
        from .gguf import open_gguf as opener
    elif fmt == "fp8":
        from .fp8 import open_fp8 as opener
    elif fmt == "gptq":
        from .gptq import open_gptq as opener
    else:
        raise SourceError(f"unknown import format {fmt!r}; known: {', '.join(FORMATS)}")
    return opener(path, cfg)


# ----------------------------------------------------------------------------------------------------
# the applier
# ----------------------------------------------------------------------------------------------------

def _role(s: TensorSpec) -> str:
    return f"{s.group}/{s.kind}/{s.projection}"


def s2pro_estimate(bits_per_role: dict[str, float], codec_bytes_per_param: float | None) -> Estimate:
    """S2 Pro's size if every tensor were stored as this import stores the tensors of the same role (group,
    kind, projection): its bits per weight applied to the s2-pro manifest; the codec at the import's bytes per
    parameter (fp32 when the import carries none)."""
    cfg = preset("s2-pro")

    def rule(s: TensorSpec):
        bpw = bits_per_role.get(_role(s))
        return None if bpw is None else {"data": math.ceil(s.numel * bpw / 8), "scales": 0}

    e = estimate(cfg, "import", rule, codec_dtype=None)
    per_param = 4.0 if codec_bytes_per_param is None else codec_bytes_per_param
    codec = round(sum(s.numel for s in codec_manifest(cfg.codec)) * per_param)
    return dataclasses.replace(e, per_component={**e.per_component, "codec": codec})


def _weight_error(info, w_hat: torch.Tensor) -> dict:
    """metrics.weight_error of the base tensor vs the import's, in blocks of rows (quantize's accumulator):
    whole, S2 Pro's 0.4 B-value token table would need ~8 GB of float64 temporaries."""
    from ..quant.apply import _ErrorAccumulator

    acc = _ErrorAccumulator(w_hat.numel())
    flat = w_hat.reshape(w_hat.shape[0], -1)
    r0 = 0
    for block in iter_row_blocks(info):
        acc.add(block, flat[r0:r0 + block.shape[0]])
        r0 += block.shape[0]
    return acc.result()


def import_checkpoint(phase: ImportPhase, base: str | Path, out: str | Path, dtype: str | None = None,
                      overwrite: bool = False) -> dict:
    """Write the import `phase` as a plain fishlab checkpoint directory `out` (atomically), measured against
    the bf16 checkpoint `base`. Returns import.json's content with the per-tensor metrics under 'metrics'."""
    from ..quant.apply import METRICS_FILE, read_quantization
    from ..samples import resolve_dtype

    base, out = Path(base).resolve(), Path(out).resolve()
    if read_quantization(base) is not None:
        raise SourceError(f"{base}: the base of an import must be the plain (bf16) checkpoint")
    cfg = load_config(base)
    cfg_t, infos = validate_transformer(base, cfg.transformer)
    dtype = dtype or resolve_dtype(None, base)
    path = phase.resolved_path()
    t0 = time.perf_counter()
    src = open_source(phase.format, path, cfg)
    specs = transformer_manifest(cfg_t)
    missing = [s.name for s in specs if s.name not in src.stored]
    if missing:
        raise SourceError(f"{path}: {len(missing)} tensor(s) of the config's manifest are not in the "
                           f"{phase.format} file, e.g. {', '.join(missing[:5])}")
    metrics: dict[str, dict] = {}

    def make(s: TensorSpec) -> torch.Tensor:
        w_hat = src.get(s.name)
        if tuple(w_hat.shape) != tuple(s.shape):
            raise SourceError(f"{path}: tensor {s.name} is {list(w_hat.shape)} in the file, the config needs "
                               f"{list(s.shape)}")
        if s.name in src.quantized:
            metrics[s.name] = dict(_weight_error(infos[s.name], w_hat), component=s.component, layer=s.layer,
                                   projection=s.projection, stored=src.stored[s.name])
        return w_hat.to(getattr(torch, dtype))

    plan = [OutTensor(s.name, tuple(s.shape), dtype, (lambda s=s: make(s))) for s in specs]
    codec = src.codec()
    n_codec = sum(s.numel for s in codec_manifest(cfg.codec))
    by_role: dict[str, list[int]] = {}
    for s in specs:
        r = by_role.setdefault(_role(s), [0, 0])
        r[0] += src.stored_bytes[s.name]
        r[1] += s.numel
    bits = {k: 8 * b / n for k, (b, n) in by_role.items()}
    shards = transformer_files(base)
    skip = {f.name for f in shards} | {spec.INDEX_FILE, METRICS_FILE}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in sorted(base.iterdir()):
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        if codec is not None:
            write_codec_pth(check_codec_state_dict(codec, cfg.codec, f"{path} (its codec)"), tmp / spec.CODEC_FILE)
        write_sharded(tmp, plan, n_shards=len(shards), metadata={"format": "pt", "fishlab_import": phase.format})
        stored_types: dict[str, int] = {}
        for s in specs:
            stored_types[src.stored[s.name]] = stored_types.get(src.stored[s.name], 0) + 1
        info = {"format_version": FORMAT_VERSION, "phase": phase.to_dict(), "base": str(base), "dtype": dtype,
                "file": {"path": str(path), "bytes": tree_bytes(path), "mtime": path.stat().st_mtime},
                "stored": stored_types, "stored_transformer_bytes": sum(src.stored_bytes.values()),
                "codec": (f"from the {phase.format} file" if codec is not None else "from the base checkpoint"),
                "codec_bytes": src.codec_bytes, "other_bytes": src.other_bytes,
                "bits_per_role": bits, "codec_bytes_per_param": (src.codec_bytes / n_codec if codec is not None
                                                                 else None),
                "quantized_tensors": len(metrics),
                "notes": src.notes + [f"run dequantized in {dtype}: its speed and memory in the reports are a "
                                      f"{dtype} model's, not those of {phase.format} kernels"],
                "seconds": time.perf_counter() - t0}
        write_json_atomic(tmp / IMPORT_FILE, info)
        write_json_atomic(tmp / METRICS_FILE, {"phase": phase.name, "tensors": metrics,
                                               "by_component": summarize(metrics, "component"),
                                               "by_projection": summarize(metrics, "projection")})
    return dict(info, metrics=metrics)


def read_import(ckpt_dir: str | Path) -> dict | None:
    p = Path(ckpt_dir) / IMPORT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def run_import(src: Path, phase: ImportPhase, work_dir: str | Path, overwrite: bool = False) -> dict:
    """`workbook.run_phase` for an import: import into work_dir/import-<name>, or reuse a complete earlier
    import of the same file (same size and mtime) against the same base. Returns what phase_summary reads:
    metrics, measured_bytes (the original on disk), predicted (its tensor data + other files), path, and
    s2pro_estimate."""
    from ..quant.apply import METRICS_FILE

    out = Path(work_dir) / f"import-{phase.name}"
    path = phase.resolved_path()
    info = read_import(out) if out.exists() else None
    same = (info is not None and info.get("phase") == phase.to_dict() and info.get("base") == str(Path(src).resolve())
            and info["file"] == {"path": str(path), "bytes": tree_bytes(path), "mtime": path.stat().st_mtime})
    if same and not overwrite and (out / METRICS_FILE).exists():
        info["metrics"] = json.loads((out / METRICS_FILE).read_text())["tensors"]
        reused = True
    else:
        info = import_checkpoint(phase, src, out, overwrite=out.exists())
        reused = False
    predicted = info["stored_transformer_bytes"] + info["codec_bytes"] + info["other_bytes"]
    return dict(info, path=str(out), reused=reused, measured_bytes=info["file"]["bytes"],
                predicted={"transformer": info["stored_transformer_bytes"], "total": predicted},
                s2pro_estimate=s2pro_estimate(info["bits_per_role"], info["codec_bytes_per_param"]),
                **{"import": {"format": phase.format, "path": str(path), "bytes": info["file"]["bytes"],
                              "stored": info["stored"], "codec": info["codec"], "notes": info["notes"]}})
