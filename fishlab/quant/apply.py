"""Apply a phase to a checkpoint: stream it tensor by tensor into a packed, loadable checkpoint directory.

The one thin layer over the primitives. Reading is memory-mapped and writing is streamed (the output header is
laid out from the manifest first, then each tensor is quantized when its bytes are due), so peak memory is
about one tensor plus its temporaries, whatever the model size. The output directory is built under a hidden
temporary name and renamed into place only when complete; the input is only ever read.

Output layout = input layout: config.json (unchanged), the same number of safetensors shards + index,
tokenizer and codec files copied, plus `quantization.json` (format version, phase, per-tensor descriptions,
measured and predicted sizes) and `quantization_metrics.json` (per-tensor weight error). Quantized weights
`X.weight` become `X.weight.qdata` + `X.weight.scale` (+ `X.weight.zero` for a zero-point scheme;
docs/packed-format.md); their descriptions are also in every shard's safetensors metadata under "quantization".

Each linear is decided on its own (`tensor_plan`: a phase's `overrides` give mixed precision): kept as stored, or
quantized under its own scheme by its own quantizer (fishlab.quant.methods); the description of every tensor
records its scheme and its quantizer with the settings used. A calibrated quantizer (GPTQ) first runs
fishlab.calibration over the checkpoint (block by block), then the stream writes its results.

Memory and speed (measured at full S2 Pro size in benchmarks/README.md): tensors are read with plain file reads
into a fresh tensor (no mmap, so no file pages are counted in the process RSS), and quantized and measured in
row chunks of about `CHUNK_ELEMS` values, so float32 temporaries stay a few MB whatever the tensor size. Scales
are per row (or per group of a row), so quantizing a block of whole rows gives exactly the rows of the whole
tensor's result; blocks are a multiple of the packing unit, so their packed streams concatenate. The block work
runs in place on reused buffers (primitives._quantize_rows_into) on one torch thread, and the next tensor's bytes
are prefetched into the page cache while the current one is quantized and written (_ReadAhead).
"""
from __future__ import annotations

import contextlib
import errno
from collections import deque
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import spec
from ..checkpoint import (CheckpointError, OutTensor, TensorInfo, compare_to_manifest, iter_tensors,
                          read_headers, read_tensor, read_tensor_into, torch_dtype, transformer_files, tree_bytes, validate_transformer,
                          write_sharded)
from ..config import ModelConfig, load_config
from ..io import atomic_dir, remove_stale_partials, write_json_atomic
from ..manifest import TensorSpec, linear_targets, transformer_manifest
from ..metrics import histc_counts, summarize, weight_error
from ..phases import Phase
from ..sizes import linear_name, phase_estimate
from . import methods
from .pack import bytes_per_unit, packed_nbytes, values_per_unit
from .primitives import (_WS, FORMAT_VERSION, READ_VERSIONS, NonFiniteWeightError, QTensor, QuantError, Scheme, _dequantize_rows_,
                         _fast_ok, _quantize_rows_into, choose_qparams, dequantize_tensor, describe,
                         from_description, quantize_tensor)

METRICS_FILE = "quantization_metrics.json"
METADATA_KEY = "quantization"
_WEIGHT_FILES = (spec.INDEX_FILE, spec.SINGLE_FILE)
CHUNK_ELEMS = 1 << 20       # values per row block when quantizing / measuring (4 MB of float32)
_ERR_REUSE_MAX = 1 << 26
METRICS_THREADS = 2             # measure on this many threads while the main one reads, quantizes and writes
                                # (the metrics cost several times the quantization; the main thread mostly
                                # waits on the disk, so two measuring threads keep both cores of a 2-core box
                                # busy); 0 = measure inline
QUANT_THREADS: int | None = 1   # torch threads for the block work (elementwise ops on ~1M values: a second
                                # thread gains little and stalls badly when the other core is busy)


class QuantizeError(RuntimeError):
    """A quantization run that could not complete; nothing was left under the output name."""


def scheme_of(phase: Phase) -> Scheme:
    return Scheme(phase.method, phase.bits, phase.group_size, phase.scale_dtype, phase.zero_point)


def tensor_plan(cfg_t, phase: Phase) -> dict[str, Phase]:
    """{HF name: the phase that quantizes it} for every linear `phase` quantizes (its per-tensor overrides
    applied, `Phase.tensor_phase`); linears absent are stored as they are."""
    targets = {s.name for s in linear_targets(cfg_t, phase.target)}
    out = {}
    for s in transformer_manifest(cfg_t):
        if s.kind == "linear":
            tp = phase.tensor_phase(linear_name(s), s.name in targets)
            if tp is not None:
                out[s.name] = tp
    return out


def _n_shards(ckpt_dir: Path) -> int:
    return 1 if not (ckpt_dir / spec.INDEX_FILE).exists() else len(transformer_files(ckpt_dir))


def _is_weight_file(p: Path) -> bool:
    return p.name in _WEIGHT_FILES or (p.name.startswith("model-") and p.suffix == ".safetensors")


def _will_need(info: TensorInfo) -> None:
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


class _ReadAhead:
    """Reads tensors in a known order; after each read, has the kernel fetch the next tensor's bytes into the
    page cache (posix_fadvise WILLNEED, issued from a helper thread since it can block while submitting), so
    the disk works while this tensor is quantized and written. A hint only: page cache is not process RSS."""

    def __init__(self, order: list[TensorInfo]):
        self.next = {a.name: b for a, b in zip(order, order[1:])}
        ok = hasattr(os, "posix_fadvise") and bool(order)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fishlab-readahead") if ok else None
        if ok:
            self.pool.submit(_will_need, order[0])

    def read(self, info: TensorInfo, reuse: bool = False) -> torch.Tensor:
        """The tensor; with `reuse`, in a buffer reused from one call to the next (for a tensor that is only
        quantized: no page faults on fresh memory for every tensor)."""
        if reuse:
            raw = _WS.get("read", info.nbytes, torch.uint8)
            t = read_tensor_into(info, raw.view(torch_dtype(info.dtype)).view(info.shape))
        else:
            t = read_tensor(info)
        nxt = self.next.get(info.name)
        if self.pool is not None and nxt is not None and nxt.nbytes:
            self.pool.submit(_will_need, nxt)
        return t

    def close(self) -> None:
        _WS.bufs.pop("read", None)          # give the big reused buffers back
        _WS.bufs.pop("m_err", None)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _ErrorAccumulator:
    """metrics.weight_error of a tensor, computed block by block (float64 sums over blocks of at most
    CHUNK_ELEMS values; agrees with weight_error to rounding of the summation order)."""

    def __init__(self, numel: int):
        # the error, kept for the histogram's second pass (a reused buffer up to 64M values: no page faults)
        self.err = (_WS.get("m_err", numel, torch.float32) if numel <= _ERR_REUSE_MAX
                    else torch.empty(numel, dtype=torch.float32))
        self.pos = 0
        self.ss_w = self.ss_e = self.dot = self.ss_h = self.abs_e = 0.0
        self.max_abs = 0.0
        self.n_nz = self.n_zeroed = 0

    def add(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        w = w.reshape(-1).float()
        w_hat = w_hat.reshape(-1).float()
        n = w.numel()
        e = self.err[self.pos:self.pos + n]
        self.pos += n
        torch.sub(w_hat, w, out=e)                      # the error in float32, as weight_error has it
        w64, h64, e64 = w.double(), w_hat.double(), e.double()
        self.ss_w += float(torch.dot(w64, w64))
        self.ss_e += float(torch.dot(e64, e64))
        self.dot += float(torch.dot(w64, h64))
        self.ss_h += float(torch.dot(h64, h64))
        if n:
            a = e64.abs_()
            self.abs_e += float(a.sum())
            self.max_abs = max(self.max_abs, float(a.max()))
        w_zero = int(torch.count_nonzero(w == 0))
        self.n_nz += n - w_zero
        self.n_zeroed += int(torch.count_nonzero(w_hat == 0)) - w_zero     # 0 always reconstructs to 0

    def add_f32(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        """add() for flat float32 w and w_hat, in few passes: the same float32 error; float64 sums of squares
        (vector norms accumulated in float64), dot(w, w_hat) from the polarisation identity
        (ss_w + ss_h - ss_e) / 2 (it differs from the direct float64 dot only by the float32 rounding of the
        error, ~1e-12 relative in practice), |e| summed in float64, non-zeros counted directly."""
        n = w.numel()
        if not n:
            return
        e = self.err[self.pos:self.pos + n]
        self.pos += n
        torch.sub(w_hat, w, out=e)
        vn = torch.linalg.vector_norm
        ss_w = float(vn(w, dtype=torch.float64)) ** 2
        ss_h = float(vn(w_hat, dtype=torch.float64)) ** 2
        ss_e = float(vn(e, dtype=torch.float64)) ** 2
        self.ss_w += ss_w
        self.ss_h += ss_h
        self.ss_e += ss_e
        self.dot += (ss_w + ss_h - ss_e) / 2
        a = torch.abs(e, out=_WS.get("m_abs", n, torch.float32))
        self.abs_e += float(a.sum(dtype=torch.float64))
        self.max_abs = max(self.max_abs, float(a.max()))
        h_zero = n - int(torch.count_nonzero(w_hat))
        w_zero = n - int(torch.count_nonzero(w)) if h_zero else 0      # w == 0 implies w_hat == 0
        self.n_nz += n - w_zero
        self.n_zeroed += h_zero - w_zero

    def result(self, scale: torch.Tensor | None = None) -> dict:
        from ..metrics import HIST_BINS
        n = self.err.numel()
        ss_w, ss_e, ss_h = self.ss_w, self.ss_e, self.ss_h
        r = self.max_abs if self.max_abs > 0 else 1.0
        hist = torch.zeros(HIST_BINS, dtype=torch.int64)
        with _threads(QUANT_THREADS):
            for i in range(0, n, CHUNK_ELEMS):      # the counts of torch.histc(err, HIST_BINS, -r, r), faster
                histc_counts(self.err[i:i + CHUNK_ELEMS], HIST_BINS, r, hist)
        # the scale statistics at the caller's thread count, as weight_error computes them (a float32 mean's
        # rounding depends on how the reduction is split)
        return {
            "numel": n,
            "rel_fro": math.sqrt(ss_e / ss_w) if ss_w > 0 else 0.0,
            "snr_db": 10 * math.log10(ss_w / ss_e) if ss_e > 0 and ss_w > 0 else math.inf,
            "cosine": self.dot / math.sqrt(ss_w * ss_h) if ss_w > 0 and ss_h > 0 else (1.0 if ss_w == ss_h else 0.0),
            "max_abs": self.max_abs,
            "mean_abs": self.abs_e / n if n else 0.0,
            "zero_fraction": self.n_zeroed / self.n_nz if self.n_nz else 0.0,
            "weight_rms": math.sqrt(ss_w / max(1, n)),
            "hist": {"range": r, "counts": [int(c) for c in hist.tolist()]},
            **({"scale": _scale_stats(scale)} if scale is not None else {}),
        }


def _scale_stats(scale: torch.Tensor) -> dict:
    """weight_error's "scale" entry (its float32 mean rounds according to the torch thread count in force)."""
    s = scale.detach().float().reshape(-1)
    return {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()),
            "zero_groups": int((s == 0).sum()), "n": s.numel()}


class _MetricsWorker:
    """Measures quantized tensors on `n` threads while the main thread reads, quantizes and writes (the weight
    error costs several times the CPU of the quantization). At most `n` jobs in flight (each holds its tensor)."""

    def __init__(self, n: int = 2):
        self.n = max(1, n)
        self.pool = ThreadPoolExecutor(max_workers=self.n, thread_name_prefix="fishlab-metrics")
        self.jobs: deque = deque()

    def reserve(self) -> None:
        """Wait until fewer than n jobs are in flight (re-raising a worker's exception here)."""
        while self.jobs and (len(self.jobs) >= self.n or self.jobs[0].done()):
            self.jobs.popleft().result()

    def wait(self) -> None:
        while self.jobs:
            self.jobs.popleft().result()

    def submit(self, fn, *args) -> None:
        self.reserve()
        self.jobs.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count set to `n` (None: unchanged) for the duration."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _quantize_blocked_fast(name: str, w: torch.Tensor, w2: torch.Tensor, scheme: Scheme, with_metrics: bool,
                           chunk_elems: int) -> tuple[QTensor, _ErrorAccumulator | None] | None:
    """quantize_blocked through the in-place kernel (primitives._quantize_rows_into): each block is read once
    into a reused float32 buffer, quantized and packed straight into its slice of the output, and measured
    from the same buffers. None when a block fails its checks (the caller's reference path raises)."""
    rows, cols = w2.shape
    bits = scheme.pack_bits
    vpu, bpu = values_per_unit(bits), bytes_per_unit(bits)
    n_groups = 1 if scheme.group_size is None else cols // scheme.group_size
    qdata = torch.empty(packed_nbytes(rows * cols, bits), dtype=torch.uint8)
    scale = torch.empty(rows, n_groups, dtype=scheme.torch_scale_dtype)
    step = max(vpu, (max(1, chunk_elems // cols) // vpu) * vpu)
    acc = _ErrorAccumulator(rows * cols) if with_metrics else None
    for r0 in range(0, rows, step):
        block = w2[r0:r0 + step]
        r = block.shape[0]
        b0 = r0 * cols // vpu * bpu
        sb = scale[r0:r0 + r]
        res = _quantize_rows_into(block, scheme, sb, qdata[b0:b0 + packed_nbytes(r * cols, bits)])
        if res is None:
            return None
        if acc is not None:
            wf, x = res
            acc.add_f32(wf, _dequantize_rows_(x, r, cols, sb, scheme))
    return QTensor(qdata, scale, scheme, tuple(w.shape), w.dtype, name), acc


def quantize_blocked(name: str, w: torch.Tensor, scheme: Scheme, with_metrics: bool = False,
                     chunk_elems: int = CHUNK_ELEMS) -> tuple[QTensor, dict | None]:
    """quantize_tensor(name, w, scheme) (the identical QTensor), computed in blocks of whole rows, and when
    asked the weight error of its reconstruction (metrics.weight_error's fields), without ever holding a
    float32 copy of the whole tensor."""
    if w.dim() < 2:
        qt = quantize_tensor(name, w, scheme)
        return qt, (weight_error(w, dequantize_tensor(qt, torch.float32), qt.scale) if with_metrics else None)
    w2 = w.reshape(w.shape[0], -1)
    if _fast_ok(w2, scheme):
        with _threads(QUANT_THREADS):
            r = _quantize_blocked_fast(name, w, w2, scheme, with_metrics, chunk_elems)
        if r is not None:
            qt, acc = r
            return qt, (acc.result(qt.scale) if acc is not None else None)
    rows, cols = w2.shape
    vpu = values_per_unit(scheme.pack_bits)
    step = max(vpu, (max(1, chunk_elems // max(cols, 1)) // vpu) * vpu)
    acc = _ErrorAccumulator(rows * cols) if with_metrics else None
    qparts, sparts, zparts = [], [], []
    for r0 in range(0, rows, step):
        block = w2[r0:r0 + step]
        try:
            qb = quantize_tensor(name, block, scheme)
        except NonFiniteWeightError:
            choose_qparams(w, scheme.pack_bits, scheme.group_size, scheme.scale_dtype, name=name)  # whole-tensor message
            raise
        qparts.append(qb.qdata)
        sparts.append(qb.scale)
        zparts.append(qb.zero)
        if acc is not None:
            acc.add(block, dequantize_tensor(qb, torch.float32))
    qdata = qparts[0] if len(qparts) == 1 else torch.cat(qparts)
    scale = sparts[0] if len(sparts) == 1 else torch.cat(sparts)
    zero = None if not scheme.zero_point else (zparts[0] if len(zparts) == 1 else torch.cat(zparts))
    qt = QTensor(qdata, scale, scheme, tuple(w.shape), w.dtype, name, zero)
    return qt, (acc.result(scale) if acc is not None else None)


@dataclass
class _Pending:
    """Quantizes a tensor when its qdata is due and hands the scale over when that is due next."""
    info: TensorInfo
    spec_: TensorSpec
    scheme: Scheme
    metrics: dict
    with_metrics: bool
    reader: _ReadAhead
    worker: _MetricsWorker | None = None
    device: torch.device | None = None
    phase: Phase | None = None              # the tensor's own phase (its quantizer); None = rtn
    precomputed: QTensor | None = None      # a calibrated quantizer's result (fishlab.calibration)
    qt: QTensor | None = None

    def qdata(self) -> torch.Tensor:
        if self.precomputed is not None or (self.phase is not None and self.phase.quantizer != "rtn"):
            return self._qdata_method()
        if self.device is not None:
            return self._qdata_on_device()
        if self.with_metrics and self.worker is not None:
            return self._qdata_pipelined()
        w = self.reader.read(self.info, reuse=True)
        try:
            self.qt, m = quantize_blocked(self.info.name, w, self.scheme, self.with_metrics)
        except QuantError as e:
            raise QuantizeError(f"{e}; nothing was written") from e
        if m is not None:
            self._record(m)
        return self.qt.qdata

    def _record(self, m: dict) -> None:
        m.update(component=self.spec_.component, projection=self.spec_.projection, layer=self.spec_.layer,
                 group=self.spec_.group, shape=list(self.spec_.shape))
        self.metrics[self.info.name] = m

    def _qdata_method(self) -> torch.Tensor:
        """A quantizer other than rtn (fishlab.quant.methods): the whole tensor in float32, on the device
        when one is given; or the QTensor calibration already made."""
        w = self.reader.read(self.info)
        qt = self.precomputed
        if qt is None:
            try:
                qt = methods.quantize_weight(self.info.name, w.to(self.device or "cpu"), self.scheme,
                                             self.phase.quantizer, self.phase.quantizer_args)
            except QuantError as e:
                raise QuantizeError(f"{e}; nothing was written") from e
        self.precomputed = None
        if self.with_metrics:
            qd = qt.to(w.device)
            self._record(weight_error(w, dequantize_tensor(qd, torch.float32), qd.scale))
        self.qt = qt.to("cpu")
        return self.qt.qdata

    def _qdata_on_device(self) -> torch.Tensor:
        """The whole tensor on the device (a GPU): quantize_tensor and weight_error there, results back."""
        w = self.reader.read(self.info).to(self.device)
        try:
            qt = quantize_tensor(self.info.name, w, self.scheme)
        except QuantError as e:
            raise QuantizeError(f"{e}; nothing was written") from e
        if self.with_metrics:
            m = weight_error(w, dequantize_tensor(qt, torch.float32), qt.scale)
            self._record(m)
        self.qt = qt.to("cpu")
        return self.qt.qdata

    def _qdata_pipelined(self) -> torch.Tensor:
        w = self.reader.read(self.info)           # a tensor of its own: the worker keeps it
        self.worker.reserve()                     # bounded memory: at most METRICS_THREADS tensors in flight
        try:
            self.qt, _ = quantize_blocked(self.info.name, w, self.scheme)
        except QuantError as e:
            raise QuantizeError(f"{e}; nothing was written") from e
        self.worker.submit(self._measure, w, _scale_stats(self.qt.scale))
        return self.qt.qdata

    def _measure(self, w: torch.Tensor, scale_stats: dict) -> None:
        _, m = quantize_blocked(self.info.name, w, self.scheme, True)   # recomputed: cheaper than handing over
        m["scale"] = scale_stats
        self._record(m)

    def scale(self) -> torch.Tensor:
        qt = self.qt
        if qt is None:
            raise QuantizeError(f"{self.info.name}: scale requested before its packed data")
        if qt.zero is None:
            self.qt = None
        return qt.scale

    def zero(self) -> torch.Tensor:
        qt, self.qt = self.qt, None
        if qt is None or qt.zero is None:
            raise QuantizeError(f"{self.info.name}: zero points requested before its packed data and scale")
        return qt.zero


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def quantize_checkpoint(src: str | Path, out: str | Path, phase: Phase, overwrite: bool = False,
                        with_metrics: bool = True, progress: bool = False,
                        device: str | torch.device | None = None) -> dict:
    """Write `phase` applied to the checkpoint `src` into the directory `out`; returns quantization.json's
    content (with the metrics under 'metrics').

    device=None: the CPU streaming path (blocked in-place kernel, measuring threads). device="cuda" (or any
    torch device): each target tensor is moved there whole and quantized (`quantize_tensor`) and measured
    (`metrics.weight_error`) on it; reading and writing stay streamed on the host. Both give the same bytes."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents:
        raise QuantizeError(f"output {out} must not be the input checkpoint or inside it")
    if out.exists() and not overwrite:
        raise QuantizeError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    cfg_t, infos = validate_transformer(src)
    if any(i.dtype not in ("bfloat16", "float16", "float32") for i in infos.values()):
        raise QuantizeError(f"{src}: not a plain float checkpoint (is it already quantized?)")
    cfg = load_config(src)
    scheme = scheme_of(phase)
    per_tensor = tensor_plan(cfg_t, phase)
    specs = transformer_manifest(cfg_t)

    predicted = predicted_bytes(cfg, phase, src, infos)
    remove_stale_partials(out)          # a hard-killed earlier run's hidden partial dir holds space too
    free = shutil.disk_usage(_existing_parent(out.parent)).free
    if predicted["total"] > free:
        raise QuantizeError(f"not enough free space for {out}: need about {predicted['total'] / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free")

    metrics: dict[str, dict] = {}
    plan: list[OutTensor] = []
    descriptions: dict[str, dict] = {}
    device = None if device is None else torch.device(device)
    calibrated: dict[str, QTensor] = {}
    calibration_info = None
    t_start = time.perf_counter()
    if any(tp.calibrated for tp in per_tensor.values()):
        from ..calibration import CalibrationError, calibrate_and_quantize
        try:
            calibrated, calibration_info = calibrate_and_quantize(src, per_tensor, device=device, progress=progress)
        except (CalibrationError, QuantError) as e:
            raise QuantizeError(f"calibration for {phase.name}: {e}; nothing was written") from e
    reader = _ReadAhead([infos[s.name] for s in specs])     # the order write_sharded reads them in
    worker = _MetricsWorker(METRICS_THREADS) if with_metrics and METRICS_THREADS and device is None else None
    for s in specs:
        info = infos[s.name]
        tp = per_tensor.get(s.name)
        if tp is not None:
            ts = scheme_of(tp)
            p = _Pending(info, s, ts, metrics, with_metrics, reader, worker, device, tp, calibrated.pop(s.name, None))
            desc = dict(_planned_description(s, info, ts), quantizer=tp.quantizer,
                        quantizer_args=methods.resolved_args(tp.quantizer, tp.quantizer_args))
            descriptions[s.name] = desc
            plan.append(OutTensor(s.name + ".qdata", (desc["qdata_nbytes"],), "uint8", p.qdata))
            plan.append(OutTensor(s.name + ".scale", tuple(desc["scale_shape"]), ts.scale_dtype, p.scale))
            if ts.zero_point:
                plan.append(OutTensor(s.name + ".zero", tuple(desc["scale_shape"]), ts.scale_dtype, p.zero))
        else:
            plan.append(OutTensor(s.name, info.shape, info.dtype, (lambda info=info: reader.read(info))))
    qmeta = {"format_version": FORMAT_VERSION, "phase": phase.to_dict(), "scheme": scheme.to_dict(),
             "tensors": descriptions}
    if calibration_info is not None:
        qmeta["calibration"] = calibration_info

    bar = _progress(sum(t.nbytes for t in plan), f"quantize {phase.name}") if progress else None
    t0 = time.perf_counter()
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for f in sorted(src.iterdir()):
                if f.is_file() and not _is_weight_file(f):
                    shutil.copy2(f, tmp / f.name)
            # with measuring threads, torch's thread count is set once for the whole stream (to QUANT_THREADS),
            # not toggled per tensor while other threads compute; the scale statistics are then computed at
            # that count too (their float32 mean can differ in the last bit from one at another thread count)
            with _threads(QUANT_THREADS if worker is not None else None):
                write_sharded(tmp, plan, n_shards=_n_shards(src),
                              metadata={"format": "pt", METADATA_KEY: json.dumps(qmeta, separators=(",", ":"))},
                              progress=bar.update if bar else None)
                if worker is not None:
                    worker.wait()                   # the last tensors' metrics
            ordered = {s.name: metrics[s.name] for s in specs if s.name in metrics}   # threads finish in any order
            metrics.clear()
            metrics.update(ordered)
            measured = tree_bytes(tmp)
            # seconds: the whole quantization (calibration included); write_seconds: the stream alone
            now = time.perf_counter()
            result = dict(qmeta, source=str(src), seconds=now - t_start, write_seconds=now - t0,
                          measured_bytes=measured, weights_bytes=sum(p.stat().st_size for p in transformer_files(tmp)),
                          predicted=predicted)
            write_json_atomic(tmp / spec.QUANT_FILE, result)
            if with_metrics:
                write_json_atomic(tmp / METRICS_FILE, {"phase": phase.name, "tensors": metrics,
                                                       "by_component": summarize(metrics, "component"),
                                                       "by_projection": summarize(metrics, "projection")})
    except OSError as e:
        what = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise QuantizeError(f"writing {out} failed ({what}); nothing was left under that name") from e
    finally:
        if worker is not None:
            worker.close()
        reader.close()
        if bar:
            bar.close()
    return dict(result, metrics=metrics)


def _planned_description(s: TensorSpec, info: TensorInfo, scheme: Scheme) -> dict:
    """The description a tensor will get, computed before any data is read (the header comes first)."""
    rows, cols = info.shape[0], math.prod(info.shape[1:])
    n_groups = 1 if scheme.group_size is None else -(-cols // scheme.group_size)
    scale = torch.zeros(rows, n_groups, dtype=scheme.torch_scale_dtype)
    probe = QTensor(torch.zeros(packed_nbytes(rows * cols, scheme.pack_bits), dtype=torch.uint8), scale, scheme,
                    tuple(info.shape), getattr(torch, info.dtype), s.name, scale if scheme.zero_point else None)
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
            if d.get("zero_point"):
                out.append(TensorSpec(s.name + ".zero", tuple(d["scale_shape"]), d["scale_dtype"], s.component,
                                      s.kind, s.group))
    return out


def load_quantized_tensors(ckpt_dir: str | Path) -> tuple[dict[str, QTensor | torch.Tensor], dict]:
    """{HF name: QTensor (quantized) or Tensor (as stored)} of a quantized checkpoint, validated strictly
    against the config and its quantization description; and the description."""
    d = Path(ckpt_dir)
    qinfo = read_quantization(d)
    if qinfo is None:
        raise CheckpointError(f"{d}: no {spec.QUANT_FILE}: not a fishlab quantized checkpoint")
    if qinfo.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(f"{d / spec.QUANT_FILE}: format_version {qinfo.get('format_version')!r}, "
                              f"this fishlab reads {', '.join(map(str, READ_VERSIONS))}")
    infos, meta = read_headers(d)
    cfg_t = load_config(d).transformer
    compare_to_manifest(infos, expected_quantized_manifest(cfg_t, qinfo), str(d), check_dtype=True)
    if METADATA_KEY in meta and json.loads(meta[METADATA_KEY])["tensors"] != qinfo["tensors"]:
        raise CheckpointError(f"{d}: safetensors metadata and {spec.QUANT_FILE} describe different tensors")
    raw = dict(iter_tensors(infos))
    out: dict[str, QTensor | torch.Tensor] = {}
    for name, desc in qinfo["tensors"].items():
        out[name] = from_description(desc, raw.pop(name + ".qdata"), raw.pop(name + ".scale"), name,
                                     raw.pop(name + ".zero") if desc.get("zero_point") else None)
    out.update(raw)
    return out, qinfo


def dequantized_state_dict(ckpt_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{HF name: tensor} with every quantized weight dequantized (float32 math, then `dtype` or the original)."""
    tensors, _ = load_quantized_tensors(ckpt_dir)
    return {k: dequantize_tensor(v, dtype) if isinstance(v, QTensor) else v for k, v in tensors.items()}
