"""Decode speed and memory of weight-only quantized linears at S2 Pro width, against this machine's memory
bandwidth (a script, not a test).

Builds, in memory and with synthetic weights, a DualAR model at S2 Pro's full width (dim 2560, 32/8 heads,
head_dim 128, intermediate 9728, 10 codebooks of 4096, the real 155776-row tied head unless --vocab says
otherwise) with fewer slow layers (4 fast layers = S2 Pro's), in three variants that differ only in their linears:

    bf16   plain nn.Linear, bfloat16
    int8   every linear INT8 per output row, fp32 scales (phase 2b's scheme, on ALL linears)
    int4   every linear INT4 g128, fp32 scales (phase 2a's scheme)

Activations, embeddings, norms and the tied head are bfloat16 in all three. A frame is what `generate` runs: one
`decode_step_static` (the sliced head: allowed ids only) + the fast loop (`fast_decode`, num_codebooks steps),
greedy. Per variant:

- memory (each variant alone in a child process): resident weight bytes, RSS after the build, peak RSS;
- speed (ONE child holding all variants, one frame of each per round after a warm-up round, so load from other
  processes hits every variant alike): frames/s (median and best frame), the weight bytes a frame reads (every
  slow linear once, the head's allowed rows, every fast linear num_codebooks times; for a packed linear its
  packed weight + the kernel's scale operand), the bandwidth that achieves, and the same child's measured
  memory bandwidth (best of a large sum and a large copy): `floor` = achieved / available;
- the full-size projection (36 slow + 4 fast layers): the measured frame plus (36 - slow layers) x the measured
  time of one slow layer's decode step (and likewise for fast layers when fewer than 4 are built).

Targets (issue 11): INT8 >= 1.7x and INT4 >= 2.5x bf16 frames/s, and every variant >= 60% of its bandwidth floor.

    .venv/bin/python benchmarks/bench_decode.py                       # 4 slow + 4 fast layers, real vocab
    .venv/bin/python benchmarks/bench_decode.py --slow-layers 2 --frames 2 --variants bf16,int4
    .venv/bin/python benchmarks/bench_decode.py --compile             # compiled decoding, same table

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
TARGET_SPEEDUP = {"int8": 1.7, "int4": 2.5}
TARGET_FLOOR = 0.6
FULL_SLOW, FULL_FAST = 36, 4


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
    """The model through `build_transformer` (the loader's seam: QTensor weights become QuantizedLinears,
    prepared for bf16 on the CPU). `shared` (a dict kept by the caller) lets several variants in one process
    share their bf16 embedding and norm tensors (the same in every variant) instead of holding a copy each."""
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


def frame_weight_bytes(model) -> dict[str, int]:
    """Weight bytes one frame reads: every slow linear once, the head's allowed rows once, every fast linear
    (fast layers + fast_output) num_codebooks times. A packed linear reads its packed weight and the kernel's
    scale operand (`kscale`) or, on the dense route, its dense weight."""
    from torch import nn

    from fishlab.model.dualar import allowed_slow_ids
    from fishlab.quant.qlinear import QuantizedLinear

    def linear_bytes(m) -> int:
        if isinstance(m, QuantizedLinear):
            ts = [m.w_dense] if m.w_dense is not None else [m.qdata] + ([m.kscale] if m.kscale is not None else [])
        else:
            ts = [m.weight]
        return sum(t.numel() * t.element_size() for t in ts)

    C = model.cfg.num_codebooks
    slow = fast = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantizedLinear)):
            if name.startswith("layers."):
                slow += linear_bytes(m)
            else:
                fast += C * linear_bytes(m)
    w = model.embeddings.weight
    head = allowed_slow_ids(model.cfg).numel() * w.size(1) * w.element_size()
    return {"slow": slow + head, "fast": fast, "total": slow + head + fast}


def memory_bandwidth(gib: float = 1.0, reps: int = 5) -> dict[str, float]:
    """This process's memory bandwidth in GB/s (1e9 bytes), best of `reps`: a sum over a float32 buffer (read
    only) and a copy between two (read + write, both counted). 'available' = the larger of the two."""
    n = int(gib * 2**30) // 4
    a = torch.ones(n)
    b = torch.empty(n)
    best_sum = best_copy = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best_sum = min(best_sum, time.perf_counter() - t)
        t = time.perf_counter()
        b.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t)
    read = 4 * n / best_sum / 1e9
    copy = 8 * n / best_copy / 1e9
    return {"read_gbs": read, "copy_gbs": copy, "available_gbs": max(read, copy)}


class Decoder:
    """Greedy frames on one model, as `generate` runs them: prefill a text prompt (sliced head), then frame after
    frame (`decode_step_static` + the fast loop). `frame()` returns the seconds of (slow part, fast part).
    compile=True: the steps `generate(compile=True)` runs (`DecodeSteps`: torch.compile'd slow step and
    position-as-tensor fast step); they compile during the first two frames."""

    def __init__(self, model, prompt_len: int, max_frames: int, compile: bool = False):
        from fishlab.generate import DecodeSteps
        self.model, cfg = model, model.cfg
        self.steps = DecodeSteps(model, compile=compile)
        g = torch.Generator().manual_seed(1)
        prompt = torch.zeros(cfg.num_codebooks + 1, prompt_len, dtype=torch.long)
        prompt[0] = torch.randint(0, 1000, (prompt_len,), generator=g)
        self.ids = self.steps.ids
        with torch.inference_mode():
            model.setup_caches(prompt_len + max_frames + 2)
            out = model.prefill(prompt, allowed_only=True)
        self.logits, self.hidden = out.logits.reshape(-1), out.hidden.reshape(-1)
        model.decode_tables()
        self.pos, self.last = prompt_len, None

    @torch.inference_mode()
    def frame(self) -> tuple[float, float]:
        from fishlab.generate import fast_decode
        from fishlab.model.dualar import _math_sdpa
        t_a = time.perf_counter()
        if self.last is not None:
            with _math_sdpa():
                self.logits, self.hidden = self.steps.slow(self.last, torch.tensor([self.pos - 1]))
        t_b = time.perf_counter()
        self.last, _ = fast_decode(self.model, self.hidden, self.ids[torch.argmax(self.logits)],
                                   fast_step=self.steps.fast)
        self.pos += 1
        return t_b - t_a, time.perf_counter() - t_b


@torch.inference_mode()
def layer_times(model, reps: int = 5) -> dict[str, float]:
    """Fastest of `reps` decode steps of ONE slow layer (static plan over the current cache, position 8) and
    of ONE fast layer (fast position 3), in seconds: the per-layer times of the full-size projection."""
    from fishlab.model.dualar import AttnPlan, _math_sdpa
    t = model.decode_tables()
    pos = torch.tensor([8])
    x = torch.randn(1, 1, model.cfg.dim, dtype=model.dtype)
    plan = AttnPlan(pos, t.length, False, (t.slots <= pos).reshape(1, t.length), grouped=True)
    rope = t.slow_rope.index_select(0, pos)
    fx = torch.randn(1, 1, model.cfg.fast_dim, dtype=model.dtype)
    frope = model._fast_rope()[3:4]
    fplan = AttnPlan(3, 4, False, None)

    def best(f) -> float:
        f()
        b = float("inf")
        for _ in range(reps):
            s = time.perf_counter()
            f()
            b = min(b, time.perf_counter() - s)
        return b

    with _math_sdpa():
        slow = best(lambda: model.layers[0](x, rope, plan))
    fast = best(lambda: model.fast_layers[0](fx, frope, fplan))
    return {"slow_layer_s": slow, "fast_layer_s": fast}


def memory_child(args) -> dict:
    """One variant alone in this process: weight bytes, RSS after the build, peak RSS after one frame."""
    from fishlab.model.load import model_weight_bytes, routes
    rss0 = _proc_status("VmRSS")
    cfg = bench_config(args.slow_layers, args.fast_layers, args.vocab)
    t0 = time.perf_counter()
    model = build_model(cfg, args.variant)
    build_s = time.perf_counter() - t0
    rss_built = _proc_status("VmRSS")
    Decoder(model, args.prompt, 1).frame()
    r = routes(model)
    route = sorted(r["counts"]) or [r["float_route"].split(" ")[0]]
    return {"variant": args.variant, "weight_bytes": model_weight_bytes(model), "rss_start": rss0,
            "rss_built": rss_built, "peak_rss": _proc_status("VmHWM"), "build_s": build_s, "routes": route}


def speed_child(args) -> dict:
    """Every variant in ONE process, timed round-robin (one frame of each per round), so that whatever else
    runs on the machine disturbs all of them alike. One warm-up round first. Bandwidth measured before and
    after the frames (the best of both is 'available')."""
    cfg = bench_config(args.slow_layers, args.fast_layers, args.vocab)
    variants = args.variants.split(",")
    bw0 = memory_bandwidth()
    shared: dict = {}
    models = {v: build_model(cfg, v, shared) for v in variants}
    warm = 2 if args.compile else 1                    # compiled: the slow step first runs in the second frame
    decs = {v: Decoder(models[v], args.prompt, args.frames + warm, compile=args.compile) for v in variants}
    times: dict[str, list] = {v: [] for v in variants}
    for r in range(args.frames + warm):
        for v in variants:
            slow, fast = decs[v].frame()
            if r >= warm:
                times[v].append((slow + fast, slow, fast))
    layers = {v: layer_times(models[v]) for v in variants}
    bw1 = memory_bandwidth()
    bw = {k: max(bw0[k], bw1[k]) for k in bw0}
    out = {}
    for v in variants:
        tot = sorted(t[0] for t in times[v])
        med = tot[len(tot) // 2] if len(tot) % 2 else (tot[len(tot) // 2 - 1] + tot[len(tot) // 2]) / 2
        out[v] = {"frame_times": tot, "best_frame_s": tot[0], "median_frame_s": med,
                  "slow_ms": 1e3 * min(t[1] for t in times[v]), "fast_ms": 1e3 * min(t[2] for t in times[v]),
                  "frame_bytes": frame_weight_bytes(models[v]), **layers[v],
                  "finite_logits": bool(torch.isfinite(decs[v].logits).all())}
    return {"speed": out, "bandwidth": bw, "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()[0]}


def _child(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra, "--slow-layers", str(args.slow_layers),
           "--fast-layers", str(args.fast_layers), "--vocab", str(args.vocab), "--frames", str(args.frames),
           "--prompt", str(args.prompt), "--variants", args.variants] + (["--compile"] if args.compile else [])
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


def projection(r: dict, cfg) -> float:
    """Full-size (36 slow + 4 fast layers) frame time from the measured frame and per-layer times."""
    C = cfg.num_codebooks
    return (r["best_frame_s"] + (FULL_SLOW - cfg.n_layer) * r["slow_layer_s"]
            + C * (FULL_FAST - cfg.fast_n_layer) * r["fast_layer_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow-layers", type=int, default=4)
    ap.add_argument("--fast-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=155776, help="slow vocab (tied head rows); default: S2 Pro's")
    ap.add_argument("--frames", type=int, default=5, help="timed frames per variant (after one warm-up frame)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt columns prefilled before decoding")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)          # child mode: memory of one variant
    ap.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)   # child mode: interleaved timing
    ap.add_argument("--compile", action="store_true",
                    help="time compiled decoding (generate(compile=True): torch.compile'd steps, fishlab's kernels as "
                         "custom ops) instead of eager; memory children and per-layer times stay eager")
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
          f"{cfg.vocab_size}, {cfg.num_codebooks} codebooks; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; decoding "
          f"{'compiled (torch.compile, compile time excluded)' if args.compile else 'eager'}")
    mem = {v: _child(args, "--variant", v) for v in variants}
    speed = _child(args, "--speed")
    bw = speed["bandwidth"]
    results = [dict(mem[v], **speed["speed"][v]) for v in variants]

    base = next((r for r in results if r["variant"] == "bf16"), None)
    print()
    hdr = (f"{'variant':<8}{'weights GiB':>12}{'RSS built':>10}{'peak RSS':>9}{'fr/s med':>9}{'fr/s best':>10}"
           f"{'slow ms':>8}{'fast ms':>8}{'speedup':>8}{'GB/frame':>9}{'GB/s':>7}{'floor':>7}"
           f"{'36+4 fr/s':>10}  route")
    print(hdr)
    print("-" * len(hdr))
    verdicts = []
    for r in results:
        wb = r["weight_bytes"]
        gbs = r["frame_bytes"]["total"] / r["best_frame_s"] / 1e9
        floor = gbs / bw["available_gbs"]
        r.update(achieved_gbs=gbs, floor=floor, projected_full_fr_s=1 / projection(r, cfg))
        sp = base["best_frame_s"] / r["best_frame_s"] if base else float("nan")
        r["speedup"] = sp
        print(f"{r['variant']:<8}{gib(wb['total']):>12}{gib(r['rss_built']):>10}{gib(r['peak_rss']):>9}"
              f"{1 / r['median_frame_s']:>9.3f}{1 / r['best_frame_s']:>10.3f}{r['slow_ms']:>8.0f}{r['fast_ms']:>8.0f}"
              f"{sp:>8.2f}{r['frame_bytes']['total'] / 1e9:>9.2f}{gbs:>7.1f}{floor:>7.2f}"
              f"{r['projected_full_fr_s']:>10.3f}  {','.join(r['routes'])}")
        if r["variant"] in TARGET_SPEEDUP and base:
            t = TARGET_SPEEDUP[r["variant"]]
            verdicts.append(f"{r['variant']} speedup {sp:.2f} (target >= {t}): {'met' if sp >= t else 'NOT met'}")
        verdicts.append(f"{r['variant']} bandwidth {gbs:.1f} of {bw['available_gbs']:.1f} GB/s = {floor:.0%} "
                        f"(target >= {TARGET_FLOOR:.0%}): {'met' if floor >= TARGET_FLOOR else 'NOT met'}")
    print(f"\nmemory bandwidth of this process (best before/after the frames): sum {bw['read_gbs']:.1f} GB/s, "
          f"copy {bw['copy_gbs']:.1f} GB/s (read + write); available = {bw['available_gbs']:.1f} GB/s")
    print("per layer (eager decode step, best): " + ", ".join(
        f"{r['variant']} slow {1e3 * r['slow_layer_s']:.1f} ms / fast {1e3 * r['fast_layer_s']:.1f} ms" for r in results))
    for v in verdicts:
        print("  " + v)
    print(f"\nGiB = 2^30 bytes, GB = 1e9. weights = parameters + packed buffers (model_weight_bytes); RSS: each "
          f"variant alone in a child (VmRSS after the build / VmHWM after one frame, python + torch included). "
          f"fr/s med / best: from the median / fastest of {args.frames} frames per variant, timed round-robin in "
          f"one process after a warm-up round (two when compiled); frame = decode_step_static (sliced head) + {cfg.num_codebooks} fast "
          f"steps; slow / fast ms = fastest of each part. speedup = best fr/s / bf16's. GB/frame = weight bytes a "
          f"frame reads; GB/s = GB/frame / best frame time; floor = GB/s / available bandwidth. 36+4 fr/s = "
          f"projected full S2 Pro (measured frame + {FULL_SLOW - cfg.n_layer} x slow layer time"
          f"{f' + {FULL_FAST - cfg.fast_n_layer} x {cfg.num_codebooks} x fast layer time' if cfg.fast_n_layer < FULL_FAST else ''}"
          f"). Load average at the end: {os.getloadavg()[0]:.2f}.")
    if not all(r["finite_logits"] for r in results):
        print("warning: non-finite logits in some variant (synthetic weights); timings still stand")
    if args.json:
        print(json.dumps({"results": results, "bandwidth": bw, "verdicts": verdicts}, indent=1))


if __name__ == "__main__":
    main()
