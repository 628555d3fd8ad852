"""Apply a phase to a checkpoint: stream it tensor by tensor into a packed, loadable checkpoint directory.

The one thin layer over the primitives. Reading is memory-mapped and writing is streamed (the output header is
laid out from the manifest first, then each tensor is quantized when its bytes are due), so peak memory is
about one tensor plus its temporaries, whatever the model size. The output directory is built under a hidden
temporary name and renamed into place only when complete; the input is only ever read.

Output layout = input layout: config.json (unchanged), the same number of safetensors shards + index,
tokenizer and codec files copied, plus `quantization.json` (format version, phase, per-tensor descriptions,
measured and predicted sizes) and `quantization_metrics.json` (per-tensor weight error). Quantized weights
`X.weight` become `X.weight.qdata` + `X.weight.scale` (docs/packed-format.md); their descriptions are also in
every shard's safetensors metadata under "quantization".
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
import torch

from .. import spec
from ..checkpoint import (CheckpointError, OutTensor, TensorInfo, compare_to_manifest, iter_tensors,
                          read_headers, transformer_files, tree_bytes, validate_transformer, write_sharded)
from ..config import ModelConfig, load_config
from ..io import atomic_dir, write_json_atomic
from ..manifest import TensorSpec, linear_targets, transformer_manifest
from ..metrics import summarize, weight_error
from ..phases import Phase
from ..sizes import phase_estimate
from .pack import packed_nbytes
from .primitives import (FORMAT_VERSION, QTensor, Scheme, dequantize_tensor, describe, from_description,
                         quantize_tensor)

METRICS_FILE = "quantization_metrics.json"
METADATA_KEY = "quantization"
_WEIGHT_FILES = (spec.INDEX_FILE, spec.SINGLE_FILE)


class QuantizeError(RuntimeError):
    """A quantization run that could not complete; nothing was left under the output name."""


def scheme_of(phase: Phase) -> Scheme:
    return Scheme(phase.method, phase.bits, phase.group_size, phase.scale_dtype)


def _n_shards(ckpt_dir: Path) -> int:
    return 1 if not (ckpt_dir / spec.INDEX_FILE).exists() else len(transformer_files(ckpt_dir))


def _is_weight_file(p: Path) -> bool:
    return p.name in _WEIGHT_FILES or (p.name.startswith("model-") and p.suffix == ".safetensors")


@dataclass
class _Pending:
    """Quantizes a tensor when its qdata is due and hands the scale over when that is due next."""
    info: TensorInfo
    spec_: TensorSpec
    scheme: Scheme
    metrics: dict
    with_metrics: bool
    qt: QTensor | None = None

    def qdata(self) -> torch.Tensor:
        (_, w), = iter_tensors({self.info.name: self.info}, [self.info.name])
        self.qt = quantize_tensor(self.info.name, w, self.scheme)
        if self.with_metrics:
            m = weight_error(w, dequantize_tensor(self.qt, torch.float32), self.qt.scale)
            m.update(component=self.spec_.component, projection=self.spec_.projection, layer=self.spec_.layer,
                     group=self.spec_.group, shape=list(self.spec_.shape))
            self.metrics[self.info.name] = m
        return self.qt.qdata

    def scale(self) -> torch.Tensor:
        qt, self.qt = self.qt, None
        if qt is None:
            raise QuantizeError(f"{self.info.name}: scale requested before its packed data")
        return qt.scale


def quantize_checkpoint(src: str | Path, out: str | Path, phase: Phase, overwrite: bool = False,
                        with_metrics: bool = True, progress: bool = False) -> dict:
    """Write `phase` applied to the checkpoint `src` into the directory `out`; returns quantization.json's
    content (with the metrics under 'metrics')."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents:
        raise QuantizeError(f"output {out} must not be the input checkpoint or inside it")
    cfg_t, infos = validate_transformer(src)
    if any(i.dtype not in ("bfloat16", "float16", "float32") for i in infos.values()):
        raise QuantizeError(f"{src}: not a plain float checkpoint (is it already quantized?)")
    cfg = load_config(src)
    scheme = scheme_of(phase)
    targets = {s.name for s in linear_targets(cfg_t, phase.target)}
    specs = transformer_manifest(cfg_t)

    predicted = predicted_bytes(cfg, phase, src, infos)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if predicted["total"] > free:
        raise QuantizeError(f"not enough free space for {out}: need about {predicted['total'] / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free")

    metrics: dict[str, dict] = {}
    plan: list[OutTensor] = []
    descriptions: dict[str, dict] = {}
    for s in specs:
        info = infos[s.name]
        if s.name in targets:
            p = _Pending(info, s, scheme, metrics, with_metrics)
            desc = _planned_description(s, info, scheme)
            descriptions[s.name] = desc
            plan.append(OutTensor(s.name + ".qdata", (desc["qdata_nbytes"],), "uint8", p.qdata))
            plan.append(OutTensor(s.name + ".scale", tuple(desc["scale_shape"]), scheme.scale_dtype, p.scale))
        else:
            plan.append(OutTensor(s.name, info.shape, info.dtype,
                                  (lambda info=info: next(iter_tensors({info.name: info}, [info.name]))[1])))
    qmeta = {"format_version": FORMAT_VERSION, "phase": phase.to_dict(), "scheme": scheme.to_dict(),
             "tensors": descriptions}

    bar = _progress(sum(t.nbytes for t in plan), f"quantize {phase.name}") if progress else None
    t0 = time.perf_counter()
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for f in sorted(src.iterdir()):
                if f.is_file() and not _is_weight_file(f):
                    shutil.copy2(f, tmp / f.name)
            write_sharded(tmp, plan, n_shards=_n_shards(src),
                          metadata={"format": "pt", METADATA_KEY: json.dumps(qmeta, separators=(",", ":"))},
                          progress=bar.update if bar else None)
            measured = tree_bytes(tmp)
            result = dict(qmeta, source=str(src), seconds=time.perf_counter() - t0,
                          measured_bytes=measured, weights_bytes=sum(p.stat().st_size for p in transformer_files(tmp)),
                          predicted=predicted)
            write_json_atomic(tmp / spec.QUANT_FILE, result)
            if with_metrics:
                write_json_atomic(tmp / METRICS_FILE, {"phase": phase.name, "tensors": metrics,
                                                       "by_component": summarize(metrics, "component"),
                                                       "by_projection": summarize(metrics, "projection")})
    except OSError as e:
        raise QuantizeError(f"writing {out} failed ({e.strerror or e}); nothing was left under that name") from e
    finally:
        if bar:
            bar.close()
    return dict(result, metrics=metrics)


def _planned_description(s: TensorSpec, info: TensorInfo, scheme: Scheme) -> dict:
    """The description a tensor will get, computed before any data is read (the header comes first)."""
    rows, cols = info.shape[0], math.prod(info.shape[1:])
    n_groups = 1 if scheme.group_size is None else -(-cols // scheme.group_size)
    probe = QTensor(torch.zeros(packed_nbytes(rows * cols, scheme.pack_bits), dtype=torch.uint8),
                    torch.zeros(rows, n_groups, dtype=scheme.torch_scale_dtype), scheme, tuple(info.shape),
                    getattr(torch, info.dtype), s.name)
    return describe(probe)


def predicted_bytes(cfg: ModelConfig, phase: Phase, src: Path, infos: dict[str, TensorInfo]) -> dict:
    """What the size analysis predicts for the output: the phase estimate of the transformer, plus the other
    files copied as they are."""
    est = phase_estimate(cfg, phase, codec_dtype=None)
    others = sum(f.stat().st_size for f in src.iterdir() if f.is_file() and not _is_weight_file(f))
    return {"transformer": est.transformer_bytes, "other_files": others, "total": est.transformer_bytes + others}


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------------
# reading a quantized checkpoint
# ----------------------------------------------------------------------------------------------------

def read_quantization(ckpt_dir: str | Path) -> dict | None:
    """quantization.json of a quantized checkpoint, or None for a plain one."""
    p = Path(ckpt_dir) / spec.QUANT_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def expected_quantized_manifest(cfg_t, qinfo: dict) -> list[TensorSpec]:
    """The tensors a quantized checkpoint must hold: the manifest with each quantized X.weight replaced by
    X.weight.qdata and X.weight.scale."""
    out = []
    for s in transformer_manifest(cfg_t):
        d = qinfo["tensors"].get(s.name)
        if d is None:
            out.append(s)
        else:
            out.append(TensorSpec(s.name + ".qdata", (d["qdata_nbytes"],), "uint8", s.component, s.kind, s.group))
            out.append(TensorSpec(s.name + ".scale", tuple(d["scale_shape"]), d["scale_dtype"], s.component,
                                  s.kind, s.group))
    return out


def load_quantized_tensors(ckpt_dir: str | Path) -> tuple[dict[str, QTensor | torch.Tensor], dict]:
    """{HF name: QTensor (quantized) or Tensor (as stored)} of a quantized checkpoint, validated strictly
    against the config and its quantization description; and the description."""
    d = Path(ckpt_dir)
    qinfo = read_quantization(d)
    if qinfo is None:
        raise CheckpointError(f"{d}: no {spec.QUANT_FILE}: not a fishlab quantized checkpoint")
    if qinfo.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d / spec.QUANT_FILE}: format_version {qinfo.get('format_version')!r}, "
                              f"this fishlab reads {FORMAT_VERSION}")
    infos, meta = read_headers(d)
    cfg_t = load_config(d).transformer
    compare_to_manifest(infos, expected_quantized_manifest(cfg_t, qinfo), str(d), check_dtype=True)
    if METADATA_KEY in meta and json.loads(meta[METADATA_KEY])["tensors"] != qinfo["tensors"]:
        raise CheckpointError(f"{d}: safetensors metadata and {spec.QUANT_FILE} describe different tensors")
    raw = dict(iter_tensors(infos))
    out: dict[str, QTensor | torch.Tensor] = {}
    for name, desc in qinfo["tensors"].items():
        out[name] = from_description(desc, raw.pop(name + ".qdata"), raw.pop(name + ".scale"), name)
    out.update(raw)
    return out, qinfo


def dequantized_state_dict(ckpt_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{HF name: tensor} with every quantized weight dequantized (float32 math, then `dtype` or the original)."""
    tensors, _ = load_quantized_tensors(ckpt_dir)
    return {k: dequantize_tensor(v, dtype) if isinstance(v, QTensor) else v for k, v in tensors.items()}
