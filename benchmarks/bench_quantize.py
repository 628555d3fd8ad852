"""Streaming benchmark of `quantize_checkpoint` at full size: wall time vs a read+write floor, and peak RSS.

    .venv/bin/python benchmarks/make_fullsize.py --out /tmp/s2pro-synthetic
    .venv/bin/python benchmarks/bench_quantize.py --checkpoint /tmp/s2pro-synthetic --phase 1b

(a) floor: the same bytes read (every tensor, with the reader quantize uses) and the same number of bytes
    written (same plan, same streaming writer, same shard count), no quantization;
(b) the phase, with and without metrics, each in a fresh subprocess: wall time and peak RSS (VmHWM), and peak
    VRAM with --device cuda (every target tensor quantized and measured on the GPU);
    --metrics-threads 1 2 runs the with-metrics case once per number of measuring threads.
With --cold (default) the input shards are dropped from the page cache (posix_fadvise DONTNEED) before each
measurement, so every run reads from disk. Outputs go beside --out (default: beside the checkpoint) and are
deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishlab.checkpoint import OutTensor, transformer_files, validate_transformer, write_sharded  # noqa: E402
from fishlab.config import load_config  # noqa: E402
from fishlab.manifest import linear_targets, transformer_manifest  # noqa: E402
from fishlab.phases import load_phase  # noqa: E402
from fishlab.quant.apply import _planned_description, read_tensor, scheme_of  # noqa: E402


def drop_cache(ckpt: Path) -> None:
    for f in transformer_files(ckpt):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def floor(ckpt: Path, phase, out: Path) -> float:
    """Read every tensor, write the output's byte count through the same writer, no quantization."""
    cfg_t, infos = validate_transformer(ckpt)
    scheme = scheme_of(phase)
    targets = {s.name for s in linear_targets(cfg_t, phase.target)}
    plan = []
    for s in transformer_manifest(cfg_t):
        info = infos[s.name]
        if s.name in targets:
            d = _planned_description(s, info, scheme)
            n = d["qdata_nbytes"]
            plan.append(OutTensor(s.name + ".qdata", (n,), "uint8",
                                  lambda info=info, n=n: read_tensor(info).reshape(-1).view(torch.uint8)[:n]))
            plan.append(OutTensor(s.name + ".scale", tuple(d["scale_shape"]), scheme.scale_dtype,
                                  lambda d=d: torch.zeros(d["scale_shape"], dtype=getattr(torch, scheme.scale_dtype))))
        else:
            plan.append(OutTensor(s.name, info.shape, info.dtype, lambda info=info: read_tensor(info)))
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    write_sharded(out, plan, n_shards=len(transformer_files(ckpt)))
    os.sync()
    return time.perf_counter() - t0


CHILD = r"""
import json, resource, sys, time, os
sys.path.insert(0, sys.argv[1])
from fishlab.phases import load_phase
from fishlab.quant import apply
from fishlab.quant.apply import quantize_checkpoint
if sys.argv[6] != "default":
    apply.METRICS_THREADS = int(sys.argv[6])
device = None if sys.argv[7] == "cpu" else sys.argv[7]
t0 = time.perf_counter()
r = quantize_checkpoint(sys.argv[2], sys.argv[3], load_phase(sys.argv[4]), with_metrics=sys.argv[5] == "1",
                        device=device)
os.sync()
wall = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
vram = None
if device is not None and device.startswith("cuda"):
    import torch
    vram = torch.cuda.max_memory_allocated()
print(json.dumps({"wall": wall, "vmhwm_kb": int(hwm), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "peak_vram_bytes": vram, "measured_bytes": r["measured_bytes"],
                  "predicted": r["predicted"]["total"], "tensors": len(r["tensors"])}))
"""


def run_phase(ckpt: Path, phase_arg: str, out: Path, metrics: bool, metrics_threads: str = "default",
              device: str = "cpu") -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ckpt), str(out), phase_arg, "1" if metrics else "0",
                        metrics_threads, device],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"quantize failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--phase", default="1b")
    ap.add_argument("--out", type=Path, help="scratch folder for the outputs (default: beside the checkpoint)")
    ap.add_argument("--warm", action="store_true", help="do not drop the input from the page cache between runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=("floor", "nometrics", "metrics"))
    ap.add_argument("--metrics-threads", nargs="*", default=["default"],
                    help="with-metrics runs with these fishlab.quant.apply.METRICS_THREADS values, side by side "
                         "(default: the module's)")
    ap.add_argument("--device", default="cpu",
                    help="cpu: the streaming CPU path; cuda: each target tensor quantized and measured on the GPU")
    a = ap.parse_args(argv)
    ckpt = a.checkpoint.resolve()
    phase = load_phase(a.phase)
    scratch = (a.out or ckpt.parent / f"bench-{ckpt.name}").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    in_bytes = sum(f.stat().st_size for f in transformer_files(ckpt))
    rows = []
    try:
        if "floor" not in a.skip:
            a.warm or drop_cache(ckpt)
            s = floor(ckpt, phase, scratch / "floor")
            out_b = sum(f.stat().st_size for f in (scratch / "floor").iterdir())
            shutil.rmtree(scratch / "floor")
            rows.append(("floor (read + write, no quant)", s, None, out_b, None))
            print(f"floor: {s:.1f} s, read {in_bytes / 1e9:.2f} GB, wrote {out_b / 1e9:.2f} GB", flush=True)
        runs = [("phase, no metrics", False, "default")] + [
            (f"phase, with metrics{'' if t == 'default' else f' ({t} measuring threads)'}", True, t)
            for t in a.metrics_threads]
        for name, metrics, threads in runs:
            if ("metrics" if metrics else "nometrics") in a.skip:
                continue
            a.warm or drop_cache(ckpt)
            r = run_phase(ckpt, a.phase, scratch / "q", metrics, threads, a.device)
            shutil.rmtree(scratch / "q")
            rows.append((name, r["wall"], r["vmhwm_kb"] / 1e6 * 1.024, r["measured_bytes"], r["peak_vram_bytes"]))
            print(f"{name}: {json.dumps(r)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fl = next((r[1] for r in rows if r[0].startswith("floor")), None)
    print(f"\nphase {phase.label}, input {in_bytes / 1e9:.2f} GB, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, {'warm' if a.warm else 'cold'} page cache, quantized on {a.device}")
    print(f"| run | seconds | x floor | peak RSS GB | peak VRAM GB | written GB |\n|---|---|---|---|---|---|")
    for name, s, rss, b, vram in rows:
        ratio = f"{s / fl:.2f}" if fl else "-"
        print(f"| {name} | {s:.1f} | {ratio} | {'-' if rss is None else f'{rss:.2f}'} | "
              f"{'-' if vram is None else f'{vram / 1e9:.2f}'} | {b / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
