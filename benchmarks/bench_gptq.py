"""GPTQ at full S2 Pro size: time and peak memory of the per-linear work for the slow AR's 180 linears.

    .venv/bin/python benchmarks/make_fullsize.py --out /tmp/s2pro-synthetic      # 9.12 GB, random weights
    .venv/bin/python benchmarks/bench_gptq.py --checkpoint /tmp/s2pro-synthetic --layers 2 [--device cuda]

For each of the first --layers slow-AR blocks, the block's five linears are read from the checkpoint (as
fishlab.calibration does) and each gets: the Hessian accumulation of --positions calibration rows
(HessianCollector's X^T X, here on Gaussian inputs: the synthetic checkpoint has no tokenizer to make text
from, and the cost does not depend on the values) and `gptq_quantize` (blocked error feedback, act-order) plus
packing. The block forwards of the sequential pass (a few matmuls per block) are not timed. Prints seconds per
block and per projection, the extrapolation to all blocks (x n_layer / --layers), and peak RSS (VmHWM) and,
on CUDA, torch's peak allocated memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishlab import spec  # noqa: E402
from fishlab.checkpoint import read_tensor, validate_transformer  # noqa: E402
from fishlab.phases import load_phase  # noqa: E402
from fishlab.quant.apply import scheme_of  # noqa: E402
from fishlab.quant.methods import quantize_weight  # noqa: E402

PROJ = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--phase", default="1b", help="the scheme (quantizer: gptq is applied)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cfg, infos = validate_transformer(Path(a.checkpoint))
    scheme = scheme_of(load_phase(a.phase))
    g = torch.Generator(device=dev).manual_seed(0)
    per_proj: dict[str, float] = {p: 0.0 for p in PROJ}
    blocks = []
    hess_s = 0.0
    for i in range(a.layers):
        t_block = time.perf_counter()
        for p in PROJ:
            name = f"{spec.HF_TEXT_PREFIX}layers.{i}.{p}.weight"
            w = read_tensor(infos[name]).to(dev)
            cols = w.shape[1]
            t0 = time.perf_counter()
            H = torch.zeros(cols, cols, device=dev)
            for r0 in range(0, a.positions, 1024):          # accumulated in batches, as the hooks see them
                x = torch.randn(min(1024, a.positions - r0), cols, device=dev, generator=g)
                H.addmm_(x.t(), x)
            H *= 2.0 / a.positions
            sync(dev)
            t1 = time.perf_counter()
            qt = quantize_weight(name, w, scheme, "gptq", {"act_order": a.act_order}, H)
            sync(dev)
            t2 = time.perf_counter()
            hess_s += t1 - t0
            per_proj[p] += t2 - t1
            del H, qt, w
        blocks.append(time.perf_counter() - t_block)
        print(f"block {i}: {blocks[-1]:.1f} s", flush=True)
    n = cfg.n_layer
    res = {"device": str(dev), "torch_threads": torch.get_num_threads(), "scheme": scheme.name,
           "act_order": a.act_order, "positions": a.positions, "layers_measured": a.layers,
           "seconds_per_block": sum(blocks) / len(blocks), "hessian_seconds_per_block": hess_s / a.layers,
           "gptq_seconds_per_block_by_projection": {p: v / a.layers for p, v in per_proj.items()},
           "extrapolated_seconds_all_blocks": sum(blocks) / len(blocks) * n, "n_layer": n,
           "peak_rss_mb": vmhwm_mb()}
    if dev.type == "cuda":
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
