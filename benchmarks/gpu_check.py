"""One short check for a CUDA machine: packed-linear routes vs dequant, eager vs compiled decode, VRAM of an
end-to-end INT4 TTS, codec in bf16/fp16 vs fp32. Prints one table and writes JSON. No download.

    .venv/bin/python benchmarks/make_fullsize.py --out /tmp/s2pro-synthetic      # 9.1 GB, once
    .venv/bin/python benchmarks/gpu_check.py --checkpoint /tmp/s2pro-synthetic --json gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --device cpu --small                # CI: the demo checkpoint
    bash benchmarks/gpu_session.sh OUTDIR       # on a lent GPU machine: checkpoint + this + the other CUDA checks

With --json the file is rewritten after every row (`"complete": false` until the end), so a run stopped at a
time limit keeps what it measured; an exception in one route or variant is a FAILED row and the rest still runs.

Sections (rows of the table; `ok` is False for a failed check, and the exit code is 1 when any check fails):

1. route: every scheme on a [intermediate, dim] linear prepared for bf16 activations on the device: the route
   `plan_route` picks, its relative error vs F.linear with the dequantized weight (batch 1 and 8; <= 1% for the
   weight-only routes, <= 5% for fp8_scaled_mm, which also quantizes the activation), and its time vs a dense
   bf16 linear of the same shape.
2. decode: variants bf16 / int8 (every linear INT8 per row) / int4 (every linear INT4 g128; --variants sets which
   and in what order), each built from the checkpoint on the device (linears quantized there with fishlab's
   primitives): greedy frames/s (prefill included) eager and compiled (`generate(compile=True)`: torch.compile
   reduce-overhead, CUDA graphs), whether both give the same frames and the share of equal codes (bf16 greedy
   frames may part after a near tie: inductor rounds fused bf16 chains differently), the check being the
   compiled steps' logits vs eager from the same state (`step_rel_err` <= STEP_TOL), peak VRAM. On CUDA the
   static decode steps also run under torch.cuda.set_sync_debug_mode("error") (a host synchronisation inside a
   step fails the check).
3. tts: the int4 variant with a codec on the device (the checkpoint's codec.pth, else synthetic weights of the
   config's codec: S2 Pro's is 391M parameters), sampled generation + codec decode: peak VRAM (goal < 6 GB on
   the full-size model).
4. codec: the same codes decoded in fp32 and in bf16 (and fp16 on CUDA): SNR of the audio difference (dB) and
   max |diff|.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fishlab.quant.primitives import (FP8_ROW, INT2_G64, INT3_G128, INT4_G128, INT8_ROW,  # noqa: E402
                                      dequantize_tensor, quantize_tensor)

SCHEMES = {"int8_row": INT8_ROW, "int4_g128": INT4_G128, "fp8_row": FP8_ROW, "int3_g128": INT3_G128,
           "int2_g64": INT2_G64}
VARIANTS = {"bf16": None, "int8": INT8_ROW, "int4": INT4_G128}
VRAM_GOAL = 6 * 2**30
# compiled vs eager decode-step logits, relative to the largest |logit|: a few roundings of the dtype through the
# layers (bf16's unit roundoff is 0.0039; a wrong kernel or a stale cache under compilation is off by O(1))
STEP_TOL = {"torch.float32": 1e-4, "torch.bfloat16": 0.06, "torch.float16": 0.01}


class Table:
    """The rows so far; with a JSON path, the file is rewritten (atomically) after every row, so a run stopped
    part-way (a time limit) still leaves what it measured, marked `"complete": false`."""

    def __init__(self, json_path: Path | None = None, info: dict | None = None, t0: float | None = None):
        self.rows: list[dict] = []
        self.json_path, self.info, self.t0 = json_path, info or {}, t0 or time.perf_counter()

    def add(self, section: str, item: str, ok: bool | None = None, **values) -> dict:
        r = {"section": section, "item": item, "ok": ok, **values}
        self.rows.append(r)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        print(f"  [{section}] {item}: {shown}{'' if ok is None else ('  ok' if ok else '  FAILED')}", flush=True)
        self.write(complete=False)
        return r

    def write(self, complete: bool) -> None:
        if self.json_path is None:
            return
        from fishlab.io import write_json_atomic
        failed = sum(r["ok"] is False for r in self.rows)
        write_json_atomic(self.json_path, {"info": self.info, "wall_s": time.perf_counter() - self.t0,
                                           "complete": complete, "rows": self.rows, "failed": failed})

    def print(self) -> None:
        print(f"\n| section | item | result | check |\n|---|---|---|---|")
        for r in self.rows:
            vals = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("section", "item", "ok"))
            print(f"| {r['section']} | {r['item']} | {vals} | {'-' if r['ok'] is None else ('ok' if r['ok'] else 'FAILED')} |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(f, device: torch.device, reps: int = 20) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    f()
    ts = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        f()
        sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------
# 1. routes
# ----------------------------------------------------------------------------------------------------

@torch.inference_mode()
def check_routes(table: Table, device: torch.device, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(torch.bfloat16)
    dense = w.to(device)
    x8 = torch.randn(8, K, generator=g).to(device=device, dtype=torch.bfloat16)
    t_dense = timed(lambda: F.linear(x8[:1], dense), device)
    for name, scheme in SCHEMES.items():
        try:
            route_row(table, device, name, scheme, w, x8, t_dense, N, K)
        except Exception as e:  # noqa: BLE001 - one scheme's failure is its own row
            error_row(table, "route", f"{name} [{N}x{K}]", e)


@torch.inference_mode()
def route_row(table: Table, device: torch.device, name: str, scheme, w, x8, t_dense: float, N: int, K: int) -> None:
    from fishlab.quant.qlinear import QuantizedLinear
    qt = quantize_tensor(name, w, scheme).to(device)
    m = QuantizedLinear.from_qtensor(qt, compute_dtype=torch.bfloat16)
    ref_w = dequantize_tensor(qt, torch.float32)
    errs = []
    for x in (x8[:1], x8):
        ref = F.linear(x.float(), ref_w)
        errs.append(float((m(x).float() - ref).norm() / ref.norm()))
    limit = 0.05 if m.route_name == "fp8_scaled_mm" else 0.01
    t = timed(lambda: m(x8[:1]), device)
    table.add("route", f"{name} [{N}x{K}]", max(errs) <= limit, route=m.route_name, rel_err_b1=errs[0],
              rel_err_b8=errs[1], ms=1e3 * t, dense_bf16_ms=1e3 * t_dense, vs_dense=t_dense / t)


# ----------------------------------------------------------------------------------------------------
# 2. decode, 3. tts
# ----------------------------------------------------------------------------------------------------

def build_variant(ckpt: Path, variant: str, device: torch.device):
    """The checkpoint as a bf16 model on the device, every linear quantized there for int8 / int4."""
    from fishlab.model.dualar import replace_linears
    from fishlab.model.load import load_transformer, prepare_linears
    from fishlab.quant.qlinear import QuantizedLinear
    model = load_transformer(ckpt, device=device, dtype=torch.bfloat16)
    scheme = VARIANTS[variant]
    if scheme is not None:
        replace_linears(model, lambda name, lin: QuantizedLinear.from_float(lin, scheme, name=name))
        prepare_linears(model, source=f"gpu_check {variant}")
    return model


def make_prompt(cfg, P: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(cfg.num_codebooks + 1, P, dtype=torch.long)
    x[0] = torch.randint(0, min(1000, cfg.semantic_begin_id - 1), (P,), generator=g)
    return x


def no_sync_in_steps(model, device: torch.device) -> bool | None:
    """CUDA only: the static slow and fast steps run with host synchronisations turned into errors."""
    if device.type != "cuda":
        return None
    from fishlab.model.dualar import _math_sdpa
    col = torch.zeros(model.cfg.num_codebooks + 1, dtype=torch.long, device=device)
    pos = torch.tensor([3], device=device)
    x = torch.zeros(1, 1, model.cfg.fast_dim, dtype=model.dtype, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode(), _math_sdpa():
            model.decode_step_static(col, pos)
            model.fast_step_static(x, torch.tensor([2], device=device))
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def decode_rate(model, prompt, frames: int, device: torch.device, compile: bool) -> tuple[float, torch.Tensor]:
    from fishlab.generate import generate_greedy
    generate_greedy(model, prompt, frames, compile=compile)              # warm-up (and compile)
    sync(device)
    t = time.perf_counter()
    out = generate_greedy(model, prompt, frames, compile=compile)
    sync(device)
    return out.size(1) / (time.perf_counter() - t), out.cpu()


def step_parity(model, prompt, device: torch.device) -> float:
    """Max |compiled - eager| of the decode steps' logits from one state (the prompt prefilled), relative to the
    largest |logit|: the slow step at the next position and the fast step at every fast position (each call
    from the same KV-cache contents). Inductor fuses bf16 pointwise chains in float32 and reduces attention in
    its own order, so compiled bf16 logits differ from eager by roundings and greedy frames may part after a
    near tie; the steps themselves must agree."""
    from fishlab.generate import COMPILE_MODE
    slow_c, fast_c = model._compiled_decode[(COMPILE_MODE, str(device))]
    bufs = list(model.buffers())

    def both(eager, compiled, *args):
        saved = [b.clone() for b in bufs]
        c = compiled(*args)
        c = c[0] if isinstance(c, tuple) else c
        c = c.clone().float()
        for b, v in zip(bufs, saved):
            b.copy_(v)
        e = eager(*args)
        e = (e[0] if isinstance(e, tuple) else e).float()
        for b, v in zip(bufs, saved):
            b.copy_(v)
        return float((c - e).abs().max() / e.abs().max().clamp_min(1e-6))

    with torch.inference_mode():
        first = model.prefill(prompt, allowed_only=True)
        col = torch.zeros(model.cfg.num_codebooks + 1, dtype=torch.long, device=device)
        col[0] = model.cfg.semantic_begin_id
        worst = both(model.decode_step_static, slow_c, col, torch.tensor([prompt.size(1)], device=device))
        x = model.fast_input(first.hidden.reshape(1, 1, -1))
        for i in range(model.cfg.num_codebooks):
            pos = torch.tensor([i], device=device)
            worst = max(worst, both(model.fast_step_static, fast_c, x, pos))
            code = torch.tensor([[i]], device=device)
            model.fast_step_static(x, pos)                 # this position's keys, for the next position
            x = model.fast_embeddings(code)
    return worst


def check_decode(table: Table, ckpt: Path, device: torch.device, variants: list[str], frames: int,
                 compile_variants: set[str], tts_frames: int, budget_s: float, t_start: float) -> None:
    """Each variant on its own: an exception in one is a FAILED row of its own and the next variant still runs."""
    for variant in variants:
        try:
            check_variant(table, ckpt, device, variant, frames, compile_variants, tts_frames, budget_s, t_start)
        except Exception as e:  # noqa: BLE001 - reported as a failed row, the run goes on
            error_row(table, "decode", variant, e)


def describe(e: Exception) -> str:
    """The traceback printed, the exception as one line for the table."""
    import traceback
    traceback.print_exc()
    return f"{type(e).__name__}: {e}"[:2000]


def error_row(table: Table, section: str, item: str, e: Exception) -> None:
    table.add(section, item, False, error=describe(e))


def check_variant(table: Table, ckpt: Path, device: torch.device, variant: str, frames: int,
                  compile_variants: set[str], tts_frames: int, budget_s: float, t_start: float) -> None:
    from fishlab.model.load import model_weight_bytes, routes
    peak_reset(device)
    t_load = time.perf_counter()
    model = build_variant(ckpt, variant, device)
    prompt = make_prompt(model.cfg)
    model.setup_caches(prompt.size(1) + max(frames, tts_frames) + 8)
    row = dict(routes=",".join(sorted(routes(model)["counts"])) or "float",
               weights_gib=model_weight_bytes(model)["total"] / 2**30, build_s=time.perf_counter() - t_load)
    eager, frames_e = decode_rate(model, prompt, frames, device, compile=False)
    row.update(frames=int(frames_e.size(1)), eager_fr_s=eager)
    ok = True
    if variant in compile_variants and time.perf_counter() - t_start < budget_s:
        try:
            t_c = time.perf_counter()
            compiled, frames_c = decode_rate(model, prompt, frames, device, compile=True)
            row["compile_and_warmup_s"] = time.perf_counter() - t_c
            same = torch.equal(frames_c, frames_e)
            agree = float((frames_c == frames_e).float().mean()) if frames_c.shape == frames_e.shape else 0.0
            rel = step_parity(model, prompt, device)
            row.update(compiled_fr_s=compiled, speedup=compiled / eager, same_frames=same, codes_agree=agree,
                       step_rel_err=rel)
            ok = rel < STEP_TOL[str(model.dtype)]           # frames may part after a near tie (see step_parity)
        except Exception as e:  # noqa: BLE001 - the eager figures still count; the row fails
            row["compiled_error"] = describe(e)
            ok = False
    elif variant in compile_variants:
        row.update(compiled="skipped (time budget)")
    s = no_sync_in_steps(model, device)
    if s is not None:
        row["no_host_sync"] = s
        ok = ok and s
    if device.type == "cuda":
        row["peak_vram_gib"] = peak_bytes(device) / 2**30
    table.add("decode", variant, ok, **row)
    if variant == "int4":
        try:
            check_tts(table, model, ckpt, device, tts_frames)
        except Exception as e:  # noqa: BLE001
            error_row(table, "tts", "int4 + codec", e)


def load_or_make_codec(ckpt: Path, device: torch.device, dtype: torch.dtype):
    from fishlab import spec
    from fishlab.config import load_config
    from fishlab.demo import synthetic_codec
    from fishlab.model import load_codec
    if (ckpt / spec.CODEC_FILE).exists():
        return load_codec(ckpt, device=device, dtype=dtype), "codec.pth"
    return synthetic_codec(load_config(ckpt).codec, device=device, dtype=dtype), "synthetic weights"


@torch.inference_mode()
def check_tts(table: Table, model, ckpt: Path, device: torch.device, frames: int) -> None:
    from fishlab.generate import frames_to_codes, generate_sampled
    codec, origin = load_or_make_codec(ckpt, device, torch.float32)
    peak_reset(device)
    t = time.perf_counter()
    out = generate_sampled(model, make_prompt(model.cfg), frames, seed=0)
    codes = frames_to_codes(out)
    audio = codec.decode(codes[None].clamp(0, None))
    sync(device)
    elapsed = time.perf_counter() - t
    peak = peak_bytes(device)
    row = dict(frames=int(codes.size(1)), audio_s=audio.size(-1) / codec.sample_rate, elapsed_s=elapsed,
               codec=origin, finite=bool(torch.isfinite(audio).all()))
    if peak is not None:
        row.update(peak_vram_gib=peak / 2**30, goal_gib=VRAM_GOAL / 2**30, under_goal=peak < VRAM_GOAL)
    table.add("tts", "int4 + codec fp32, sampled", bool(torch.isfinite(audio).all()), **row)
    check_codec(table, codec, codes, ckpt, device)


def snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    e = float((x.double() - ref.double()).pow(2).sum())
    s = float(ref.double().pow(2).sum())
    return math.inf if e == 0 else 10 * math.log10(s / e) if s > 0 else -math.inf


@torch.inference_mode()
def check_codec(table: Table, codec32, codes: torch.Tensor, ckpt: Path, device: torch.device) -> None:
    ref = codec32.decode(codes[None].clamp(0, None)).float()
    dtypes = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for dt in dtypes:
        low, _ = load_or_make_codec(ckpt, device, dt)
        peak_reset(device)
        a = low.decode(codes[None].clamp(0, None)).float()
        row = dict(snr_db=snr_db(ref, a), max_abs_diff=float((a - ref).abs().max()),
                   ref_rms=float(ref.pow(2).mean().sqrt()), finite=bool(torch.isfinite(a).all()))
        if device.type == "cuda":
            row["peak_vram_gib"] = peak_bytes(device) / 2**30
        table.add("codec", f"{str(dt).replace('torch.', '')} vs float32", bool(torch.isfinite(a).all()), **row)
        del low


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpoint", type=Path, help="full-size synthetic (make_fullsize.py) or real checkpoint")
    ap.add_argument("--small", action="store_true", help="the demo checkpoint instead (CI, CPU)")
    ap.add_argument("--frames", type=int, help="timed greedy frames per variant (default 32 on cuda, 4 on cpu)")
    ap.add_argument("--tts-frames", type=int, help="frames of the end-to-end TTS (default 256 on cuda, 8 on cpu)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="decode variants, in this order")
    ap.add_argument("--compile-variants",
                    help="variants also timed compiled, '' for none (default: all on cuda, int4 on cpu)")
    ap.add_argument("--codec-only", action="store_true",
                    help="only section 4, on random codes of --tts-frames frames (e.g. the S2 Pro codec on a CPU)")
    ap.add_argument("--budget", type=float, default=270, help="seconds after which compiled runs are skipped")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small to check the script itself")
    if a.small:
        from fishlab.demo import demo_checkpoint
        ckpt = demo_checkpoint()
    elif a.checkpoint:
        ckpt = a.checkpoint.resolve()
    else:
        raise SystemExit("pass --checkpoint DIR (benchmarks/make_fullsize.py makes one) or --small")
    cpu = device.type == "cpu"
    frames = a.frames or (4 if cpu else 32)
    tts_frames = a.tts_frames or (8 if cpu else 256)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}: choose from {list(VARIANTS)}")
    default_compiled = "int4" if cpu else ",".join(variants)
    compile_variants = set((default_compiled if a.compile_variants is None else a.compile_variants).split(",")) - {""}
    if cpu:
        torch.set_num_threads(1 if a.small else min(torch.get_num_threads(), 2))   # demo size: one thread
    from fishlab.config import load_config
    cfg = load_config(ckpt).transformer
    t0 = time.perf_counter()
    info = {"device": str(device), "name": torch.cuda.get_device_name(device) if not cpu else "cpu",
            "capability": list(torch.cuda.get_device_capability(device)) if not cpu else None,
            "torch": torch.__version__, "checkpoint": str(ckpt), "layers": [cfg.n_layer, cfg.fast_n_layer],
            "dim": cfg.dim}
    print(f"gpu_check on {info['name']} (torch {torch.__version__}), checkpoint {ckpt} "
          f"({cfg.n_layer} + {cfg.fast_n_layer} layers, dim {cfg.dim})", flush=True)
    table = Table(a.json, info, t0)
    try:
        if a.codec_only:
            g = torch.Generator().manual_seed(0)
            codes = torch.randint(0, 1024, (cfg.num_codebooks, tts_frames), generator=g).to(device)
            with torch.inference_mode():
                check_codec(table, load_or_make_codec(ckpt, device, torch.float32)[0], codes, ckpt, device)
        else:
            check_routes(table, device, cfg.intermediate_size, cfg.dim)
            check_decode(table, ckpt, device, variants, frames, compile_variants, tts_frames, a.budget, t0)
    except Exception as e:  # reported in the table and the JSON, and the run fails
        table.add("error", "exception", False, message=describe(e))
    wall = time.perf_counter() - t0
    table.print()
    failed = [r for r in table.rows if r["ok"] is False]
    print(f"\n{len(table.rows)} rows, {len(failed)} failed, {wall:.0f} s")
    table.write(complete=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
