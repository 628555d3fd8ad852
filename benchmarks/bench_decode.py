"""Decode speed and memory of weight-only quantized linears at S2 Pro width (a script, not a test).

Builds, in memory and with synthetic weights, a DualAR model at S2 Pro's full width (dim 2560, 32/8 heads,
head_dim 128, intermediate 9728, 10 codebooks of 4096, the real 155776-row tied head unless --vocab says
otherwise) with fewer layers, in three variants that differ only in their linears:

    bf16   plain nn.Linear, bfloat16
    int8   every linear INT8 per output row, fp32 scales (phase 2b's scheme, on ALL linears)
    int4   every linear INT4 g128, fp32 scales (phase 2a's scheme)

Activations, embeddings, norms and the tied head are bfloat16 in all three. Each variant is built and timed in
its own subprocess, so its peak RSS (VmHWM) is its own. Per variant: resident weight bytes
(`model_weight_bytes`), RSS after the build and peak RSS (each variant alone in a child process), the linear
route taken, the time of one batch-1 9728x2560 linear, and greedy decode speed: one frame = one slow
`decode_step` + the fast loop (`fishlab.generate.fast_decode`, num_codebooks fast steps). Speed is measured
in ONE more child holding all variants, one frame of each per round (round-robin, one warm-up round), so
that other load on the machine disturbs every variant alike; the table shows the median and the fastest
frame.

    .venv/bin/python benchmarks/bench_decode.py                       # 4 slow + 4 fast layers, real vocab
    .venv/bin/python benchmarks/bench_decode.py --slow-layers 2 --frames 2 --variants bf16,int4

Synthetic weights: one random matrix per shape is drawn (and quantized) once and copied into every layer
(distinct storage, same values), which keeps the build fast; decode speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VARIANTS = ("bf16", "int8", "int4")


def _proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return -1


def bench_config(slow_layers: int, fast_layers: int, vocab: int):
    from fishlab.config import preset
    t = preset("s2-pro").transformer
    changes = dict(n_layer=slow_layers, fast_n_layer=fast_layers, max_seq_len=4096)
    if vocab != t.vocab_size:                      # a reduced vocab: the 4096 semantic ids at its top
        if vocab < t.codebook_size + 64:
            raise SystemExit(f"--vocab must be at least {t.codebook_size + 64}")
        sem0 = vocab - t.codebook_size - 2
        changes.update(vocab_size=vocab, semantic_begin_id=sem0, semantic_end_id=sem0 + t.codebook_size - 1,
                       eos_token_id=2, pad_token_id=3, audio_pad_token_id=4)
    return dataclasses.replace(t, **changes).validate("bench config")


def build_model(cfg, variant: str, shared: dict | None = None):
    """The model through `build_transformer` (the loader's seam): QTensor weights become QuantizedLinears.
    `shared` (a dict kept by the caller) lets several variants in one process share their bf16 embedding and
    norm tensors (the same in every variant) instead of holding a copy each."""
    from fishlab.manifest import transformer_manifest
    from fishlab.model.load import build_transformer
    from fishlab.quant.primitives import QTensor, Scheme, quantize_tensor

    scheme = {"bf16": None, "int8": Scheme("int", 8, None), "int4": Scheme("int", 4, 128)}[variant]
    g = torch.Generator().manual_seed(0)
    templates: dict[tuple, object] = {}
    tensors = {}
    for s in transformer_manifest(cfg):
        shape = tuple(s.shape)
        if s.kind == "linear":
            if shape not in templates:
                w = (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)
                templates[shape] = w if scheme is None else quantize_tensor("template", w, scheme)
                del w
            tpl = templates[shape]
            if scheme is None:
                tensors[s.internal] = tpl.clone()
            else:
                tensors[s.internal] = QTensor(tpl.qdata.clone(), tpl.scale.clone(), tpl.scheme, tpl.shape,
                                              tpl.dtype, s.internal)
        elif shared is not None and s.internal in shared:
            tensors[s.internal] = shared[s.internal]
        elif s.kind == "embedding":
            rows, cols = shape
            block = (torch.randn(min(rows, 4096), cols, generator=g) * cols ** -0.5).to(torch.bfloat16)
            tensors[s.internal] = block.repeat(-(-rows // block.shape[0]), 1)[:rows].contiguous()
        else:
            tensors[s.internal] = torch.ones(shape, dtype=torch.bfloat16)
    del templates
    if shared is not None:
        shared.update({k: v for k, v in tensors.items() if k not in shared and isinstance(v, torch.Tensor)
                       and not k.endswith(tuple(f".{p}.weight" for p in ("wqkv", "wo", "w1", "w2", "w3")))
                       and k != "fast_output.weight"})
    return build_transformer(cfg, tensors, source=f"bench {variant}", consume=True)


class Decoder:
    """Greedy frames on one model: prefill a text prompt, then frame after frame (slow decode_step + the fast
    loop). `frame()` returns the seconds one frame took (slow part, fast part)."""

    def __init__(self, model, prompt_len: int, max_frames: int):
        from fishlab.generate import semantic_bias
        self.model, cfg = model, model.cfg
        g = torch.Generator().manual_seed(1)
        prompt = torch.zeros(cfg.num_codebooks + 1, prompt_len, dtype=torch.long)
        prompt[0] = torch.randint(0, 1000, (prompt_len,), generator=g)
        self.bias = semantic_bias(model)
        with torch.inference_mode():
            model.setup_caches(prompt_len + max_frames + 2)
            self.out = model.prefill(prompt)
        self.pos, self.last = prompt_len, None

    @torch.inference_mode()
    def frame(self) -> tuple[float, float]:
        from fishlab.generate import fast_decode
        t_a = time.perf_counter()
        if self.last is not None:
            self.out = self.model.decode_step(self.last, self.pos - 1)
        t_b = time.perf_counter()
        logits, hidden = self.out.logits.reshape(-1), self.out.hidden.reshape(-1)
        self.last, _ = fast_decode(self.model, hidden, torch.argmax(logits + self.bias))
        self.pos += 1
        return t_b - t_a, time.perf_counter() - t_b


def linear_ms(model, reps: int = 10) -> float:
    """Fastest of `reps` batch-1 bf16 forwards of the first slow layer's w1 (9728 x 2560)."""
    lin = model.layers[0].feed_forward.w1
    x = torch.randn(1, 1, lin.in_features, dtype=torch.bfloat16)
    best = float("inf")
    with torch.inference_mode():
        lin(x)
        for _ in range(reps):
            t = time.perf_counter()
            lin(x)
            best = min(best, time.perf_counter() - t)
    return 1e3 * best


def memory_child(args) -> dict:
    """One variant alone in this process: weight bytes, RSS after the build, peak RSS after one frame."""
    from fishlab.model.load import model_weight_bytes
    from fishlab.quant.qlinear import QuantizedLinear
    rss0 = _proc_status("VmRSS")
    cfg = bench_config(args.slow_layers, args.fast_layers, args.vocab)
    t0 = time.perf_counter()
    model = build_model(cfg, args.variant)
    build_s = time.perf_counter() - t0
    rss_built = _proc_status("VmRSS")
    Decoder(model, args.prompt, 1).frame()
    routes = sorted({m.route(torch.zeros(1, m.in_features, dtype=torch.bfloat16))
                     for m in model.modules() if isinstance(m, QuantizedLinear)}) or ["bf16 F.linear"]
    return {"variant": args.variant, "weight_bytes": model_weight_bytes(model), "rss_start": rss0,
            "rss_built": rss_built, "peak_rss": _proc_status("VmHWM"), "build_s": build_s, "routes": routes}


def speed_child(args) -> dict:
    """Every variant in ONE process, timed round-robin (one frame of each per round), so that whatever else
    runs on the machine disturbs all of them alike. One warm-up round first."""
    cfg = bench_config(args.slow_layers, args.fast_layers, args.vocab)
    variants = args.variants.split(",")
    shared: dict = {}
    models = {v: build_model(cfg, v, shared) for v in variants}
    decs = {v: Decoder(models[v], args.prompt, args.frames + 1) for v in variants}
    times: dict[str, list] = {v: [] for v in variants}
    for r in range(args.frames + 1):
        for v in variants:
            slow, fast = decs[v].frame()
            if r:
                times[v].append((slow + fast, slow, fast))
    lin = {v: linear_ms(models[v]) for v in variants}
    out = {}
    for v in variants:
        tot = sorted(t[0] for t in times[v])
        med = tot[len(tot) // 2] if len(tot) % 2 else (tot[len(tot) // 2 - 1] + tot[len(tot) // 2]) / 2
        out[v] = {"frame_times": tot, "best_frame_s": tot[0], "median_frame_s": med,
                  "slow_ms": 1e3 * min(t[1] for t in times[v]), "fast_ms": 1e3 * min(t[2] for t in times[v]),
                  "linear_ms": lin[v], "finite_logits": bool(torch.isfinite(decs[v].out.logits).all())}
    return {"speed": out, "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()[0]}


def _child(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra, "--slow-layers", str(args.slow_layers),
           "--fast-layers", str(args.fast_layers), "--vocab", str(args.vocab), "--frames", str(args.frames),
           "--prompt", str(args.prompt), "--variants", args.variants]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"{' '.join(extra)} failed (exit {p.returncode})")
    r = json.loads(line[len("RESULT "):])
    print(f"  {' '.join(extra)}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return r


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow-layers", type=int, default=4)
    ap.add_argument("--fast-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=155776, help="slow vocab (tied head rows); default: S2 Pro's")
    ap.add_argument("--frames", type=int, default=3, help="timed frames per variant (after one warm-up frame)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt columns prefilled before decoding")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)          # child mode: memory of one variant
    ap.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)   # child mode: interleaved timing
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()

    if args.variant:
        print("RESULT " + json.dumps(memory_child(args)))
        return
    if args.speed:
        print("RESULT " + json.dumps(speed_child(args)))
        return

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    cfg = bench_config(args.slow_layers, args.fast_layers, args.vocab)
    print(f"S2 Pro width (dim {cfg.dim}, heads {cfg.n_head}/{cfg.n_local_heads}, head_dim {cfg.head_dim}, "
          f"intermediate {cfg.intermediate_size}), {cfg.n_layer} slow + {cfg.fast_n_layer} fast layers, vocab "
          f"{cfg.vocab_size}, {cfg.num_codebooks} codebooks; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    mem = {v: _child(args, "--variant", v) for v in variants}
    speed = _child(args, "--speed")
    results = [dict(mem[v], **speed["speed"][v]) for v in variants]

    base = next((r for r in results if r["variant"] == "bf16"), None)
    print()
    hdr = (f"{'variant':<8}{'weights GiB':>12}{'linears GiB':>12}{'RSS built':>10}{'peak RSS':>9}"
           f"{'w1 ms':>7}{'fr/s med':>9}{'fr/s best':>10}{'slow ms':>8}{'fast ms':>8}{'speedup':>8}{'bytes x':>8}"
           f"{'spd/bytes':>10}  route")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        wb = r["weight_bytes"]
        lin = wb["quantized_linears"] + wb["float_linears"]
        if base:
            speedup = base["best_frame_s"] / r["best_frame_s"]
            bytes_x = base["weight_bytes"]["total"] / wb["total"]
            extra = f"{speedup:>8.2f}{bytes_x:>8.2f}{speedup / bytes_x:>10.2f}"
        else:
            extra = f"{'-':>8}{'-':>8}{'-':>10}"
        print(f"{r['variant']:<8}{gib(wb['total']):>12}{gib(lin):>12}{gib(r['rss_built']):>10}"
              f"{gib(r['peak_rss']):>9}{r['linear_ms']:>7.1f}{1 / r['median_frame_s']:>9.3f}"
              f"{1 / r['best_frame_s']:>10.3f}{r['slow_ms']:>8.0f}{r['fast_ms']:>8.0f}"
              f"{extra}  {','.join(r['routes'])}")
    print(f"\nGiB = 2^30 bytes. weights = parameters + packed buffers (model_weight_bytes); RSS in GiB (each "
          f"variant alone in a child: VmRSS after the build / VmHWM after one frame, python + torch included). "
          f"w1 ms = fastest batch-1 bf16 forward of one 9728x2560 linear. fr/s med / best = frames per second "
          f"from the median / fastest of {args.frames} frames per variant, timed round-robin in one process after "
          f"a warm-up round; frame = slow "
          f"decode_step + {cfg.num_codebooks} fast steps; slow / fast ms = fastest of each part. speedup = best "
          f"fr/s / bf16's best fr/s; bytes x = bf16 weight bytes / variant weight bytes; spd/bytes = speedup / "
          f"bytes x (1.0 = what the byte reduction alone would give a purely bandwidth-bound decode). Load "
          f"average at the end: {os.getloadavg()[0]:.2f} (other processes on the box skew timings; the best "
          f"frame is the least disturbed).")
    if not all(r["finite_logits"] for r in results):
        print("warning: non-finite logits in some variant (synthetic weights); timings still stand")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
