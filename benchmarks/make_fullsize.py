"""Build a full-size, S2 Pro-shaped synthetic checkpoint by streaming (for the quantization benchmarks).

    .venv/bin/python benchmarks/make_fullsize.py --out /tmp/s2pro-synthetic

The `s2-pro` preset's manifest: 358 tensors with the real HF names, bf16, 2 shards + index, config.json
(9.12 GB). No codec.pth (the benchmarks quantize the transformer only). Never holds the model: each tensor is
made when the writer reaches it, by tiling random slices of a 16M-value pool of heavy-tailed (Student-t(4))
values and multiplying by a log-normal per-row scale; norms are 1 + small noise. Finite, not constant, cheap;
the statistics are only roughly those of the demo's `synthetic_linear` (no outlier columns).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fishlab import spec  # noqa: E402
from fishlab.checkpoint import OutTensor, write_sharded  # noqa: E402
from fishlab.config import preset  # noqa: E402
from fishlab.io import atomic_dir, write_json_atomic  # noqa: E402
from fishlab.manifest import transformer_manifest  # noqa: E402

POOL = 1 << 24


def make_pool(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(POOL, generator=g)
    chi2 = torch.randn(4, POOL, generator=g).pow_(2).sum(0)
    return (z / torch.sqrt(chi2 / 4) / math.sqrt(2)).to(torch.bfloat16)      # unit-variance t(4)


def tensor_maker(s, pool: torch.Tensor, seed: int):
    def make() -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.name.encode()))
        if s.kind == "norm":
            return (1.0 + 0.1 * torch.randn(s.shape, generator=g)).to(torch.bfloat16)
        rows, cols = s.shape[0], math.prod(s.shape[1:])
        out = torch.empty(rows * cols, dtype=torch.bfloat16)
        chunk = POOL // 2
        offs = torch.randint(0, POOL - chunk, (-(-out.numel() // chunk),), generator=g).tolist()
        for i, o in zip(range(0, out.numel(), chunk), offs):
            n = min(chunk, out.numel() - i)
            out[i:i + n].copy_(pool[o:o + n])
        row_scale = (torch.exp(0.35 * torch.randn(rows, 1, generator=g)) * cols ** -0.5).to(torch.bfloat16)
        return out.view(rows, cols).mul_(row_scale).view(s.shape)
    return make


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    cfg = preset("s2-pro")
    specs = transformer_manifest(cfg.transformer)
    pool = make_pool(a.seed)
    t0 = time.perf_counter()
    with atomic_dir(a.out, overwrite=a.overwrite) as tmp:
        write_json_atomic(tmp / spec.CONFIG_FILE, cfg.transformer.to_hf_dict())
        tensors = [OutTensor(s.name, s.shape, s.dtype, tensor_maker(s, pool, a.seed)) for s in specs]
        write_sharded(tmp, tensors, n_shards=2, metadata={"format": "pt", "fishlab_synthetic": "fullsize"})
    total = sum(f.stat().st_size for f in a.out.iterdir())
    print(f"wrote {a.out}: {len(specs)} tensors, {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
