"""GGUF export at S2 Pro scale: time, peak RSS and a full read-back check of every tensor.

    .venv/bin/python benchmarks/bench_export_gguf.py                  # demo transformer + S2 Pro-geometry codec
    .venv/bin/python benchmarks/make_fullsize.py --out /tmp/s2pro-synthetic
    .venv/bin/python benchmarks/bench_export_gguf.py --checkpoint /tmp/s2pro-synthetic --add-codec --type q8_0

s2.cpp loads only S2 Pro's codec geometry, so the default builds (in a temp dir) the demo transformer with the
real codec's shapes: a 1.6 GB float32 codec.pth of 391 M synthetic values (the demo's codec initialisation).
`--checkpoint` exports a given plain checkpoint instead (`--add-codec` first writes such a codec.pth into it
when it has none, as make_fullsize.py's checkpoint does not).

The export runs in a child process (`fishlab.export.gguf.export_gguf`), which reports its wall time and peak
RSS (ru_maxrss). Then this process reads the file back with gguf-py's `GGUFReader` and checks it against the
source, independently of fishlab's layout module: tensor names and order; every transformer tensor
dequantized equals the source cast to the float type exactly, or equals gguf-py's own quantize -> dequantize
of the source values bit for bit (and lies within the type's block error); every codec tensor equals the
source (weight-norm pairs folded with torch's `_weight_norm`) cast to float16 within one f16 rounding, or
float32 exactly. `verify()` is the oracle tests/test_gguf_export.py uses too. Exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishlab import spec  # noqa: E402
from fishlab.checkpoint import iter_tensors, read_headers  # noqa: E402
from fishlab.config import CodecConfig, ModelConfig, load_config, preset  # noqa: E402
from fishlab.demo import build_demo_checkpoint, codec_tensor  # noqa: E402
from fishlab.manifest import codec_manifest, transformer_manifest  # noqa: E402
from fishlab.model.codec_load import find_codec_file, read_codec_file, write_codec_pth  # noqa: E402

FLOATS = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
          gguf.GGMLQuantizationType.BF16: torch.bfloat16}
# worst |error| of one value / its block's max |value| with an exact scale: half a step (Q4_0/Q5_0 clip the
# far side's largest value by a whole step; Q4_1/Q5_1 steps span max - min <= 2 max). The f16 rounding of
# the scale (and the min) adds at most 2^-11 of it each, or 2^-25 absolute where the scale is an f16
# subnormal (< 2^-14), times at most 127 steps.
BLOCK_ERROR = {"Q8_0": 0.5 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31}


def block_error_bound(type_name: str, amax=1.0):
    """The largest |error| a block whose max |value| is amax may have (amax=1: as a fraction, normal scales)."""
    return (BLOCK_ERROR[type_name] + 2 * 2 ** -11) * amax + 128 * 2 ** -25 * (amax != 0)


def gguf_codec_name(name: str) -> tuple[str, str | None]:
    """(GGUF name, role) of a codec.pth tensor: weight-norm g/v fold into `c.X.weight`."""
    for g, v in ((".parametrizations.weight.original0", ".parametrizations.weight.original1"),
                 (".weight_g", ".weight_v")):
        if name.endswith(g):
            return "c." + name[: -len(g)] + ".weight", "g"
        if name.endswith(v):
            return "c." + name[: -len(v)] + ".weight", "v"
    return "c." + name, None


def header(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _values(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def verify(path: str | Path, ckpt: str | Path) -> dict:
    """Check a GGUF against its source checkpoint; raises AssertionError naming the first mismatch. Returns
    {header, types: {name: type}, max_block_error: {type: worst error / block max}}."""
    r = gguf.GGUFReader(path)
    cfg = load_config(ckpt)
    by_name = {t.name: t for t in r.tensors}
    tspecs = transformer_manifest(cfg.transformer)
    infos, _ = read_headers(ckpt)
    sd = read_codec_file(find_codec_file(ckpt))
    codec_names: list[str] = []
    parts: dict[str, dict] = {}
    for s in codec_manifest(cfg.codec):
        n, role = gguf_codec_name(s.name)
        if n not in parts:
            codec_names.append(n)
        parts.setdefault(n, {})[role] = s.name
    tname = {s.name: s.name.removeprefix("text_model.model.") for s in tspecs}
    for s in tspecs:
        if s.name.startswith("audio_decoder.codebook_embeddings."):
            tname[s.name] = s.name.removeprefix("audio_decoder.")
        elif s.name.startswith("audio_decoder."):
            tname[s.name] = "fast_" + s.name.removeprefix("audio_decoder.")
    expected = [tname[s.name] for s in tspecs] + codec_names
    got = [t.name for t in r.tensors]
    diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert got == expected, (f"tensor names differ at #{diff}: {got[diff:diff + 1]} vs {expected[diff:diff + 1]} "
                             f"({len(got)} vs {len(expected)} tensors)")
    worst: dict[str, float] = {}
    types = {}
    for s, (_, w) in zip(tspecs, iter_tensors(infos, [s.name for s in tspecs])):
        t = by_name[tname[s.name]]
        types[t.name] = t.tensor_type.name
        got_v = _values(t)
        assert got_v.shape == tuple(s.shape), f"{t.name}: shape {got_v.shape}, source {tuple(s.shape)}"
        if t.tensor_type in FLOATS:
            want = w.to(FLOATS[t.tensor_type]).float().numpy()
            assert np.array_equal(got_v, want), f"{t.name}: {t.tensor_type.name} values differ from the source cast"
            continue
        x = w.float().numpy()
        ref = gguf.quants.dequantize(gguf.quants.quantize(x, t.tensor_type), t.tensor_type)
        assert np.array_equal(got_v, ref), f"{t.name}: differs from gguf-py's own {t.tensor_type.name} round trip"
        bs = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        err = np.abs(got_v - x).reshape(-1, bs).max(1)
        amax = np.abs(x).reshape(-1, bs).max(1)
        bad = err > block_error_bound(t.tensor_type.name, amax)
        assert not bad.any(), (f"{t.name}: block {int(np.argmax(bad))} error {float(err[bad][0]):.4g} exceeds the "
                               f"{t.tensor_type.name} bound for its max {float(amax[bad][0]):.4g}")
        ratio = float(np.max(err / np.maximum(amax, 1e-30)))
        worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), ratio)
    for n in codec_names:
        t = by_name[n]
        types[n] = t.tensor_type.name
        p = parts[n]
        src = (torch._weight_norm(sd[p["v"]].float(), sd[p["g"]].float(), 0) if "g" in p else sd[p[None]].float())
        got_v = _values(t)
        assert got_v.shape == tuple(src.shape), f"{n}: shape {got_v.shape}, source {tuple(src.shape)}"
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(got_v, src.numpy()), f"{n}: F32 values differ from the source"
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, f"{n}: codec tensor stored as {t.tensor_type.name}"
            ref = src.numpy()
            ok = np.abs(got_v - ref) <= np.abs(ref) * 2 ** -10 + 2 ** -24
            assert ok.all(), f"{n}: F16 values differ from the (folded) source by more than one f16 rounding"
    return {"header": header(r), "types": types, "max_block_error": worst}


def add_s2pro_codec(ckpt: Path, seed: int = 0) -> None:
    """Write a float32 codec.pth of S2 Pro's codec geometry (no codec_config.json: the default is S2 Pro's)."""
    write_codec_pth({s.name: codec_tensor(s, seed) for s in codec_manifest(CodecConfig())}, ckpt / spec.CODEC_FILE)


def build_small(out: Path) -> Path:
    """The demo transformer with S2 Pro's codec geometry (codec_config.json states it)."""
    demo = preset("demo")
    return build_demo_checkpoint(out, cfg=ModelConfig("demo-s2pro-codec", demo.transformer, CodecConfig()))


# peak RSS = VmHWM of the child (ru_maxrss would carry the parent's peak over exec on Linux)
CHILD = """
import json, sys
from fishlab.export.gguf import export_gguf
r = export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
r["peak_rss_bytes"] = int(hwm.split()[1]) * 1024
print(json.dumps(r))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a plain checkpoint (default: build the small one)")
    ap.add_argument("--add-codec", action="store_true", help="write an S2 Pro-geometry codec.pth if missing")
    ap.add_argument("--type", default="f16")
    ap.add_argument("--out", type=Path, help="where the .gguf goes (default: a temp dir; deleted afterwards)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fishlab-gguf-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = a.checkpoint or build_small(tmp / "ckpt")
        if a.add_codec and not (ckpt / spec.CODEC_FILE).exists():
            add_s2pro_codec(ckpt)
        built = time.perf_counter() - t0
        out = a.out or tmp / f"export-{a.type}.gguf"
        child = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), a.type], cwd=ROOT,
                               capture_output=True, text=True)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return 1
        r = json.loads(child.stdout.strip().splitlines()[-1])
        t1 = time.perf_counter()
        try:
            v = verify(out, ckpt)
        except AssertionError as e:
            print(f"MISMATCH: {e}", file=sys.stderr)
            return 1
        res = {"checkpoint": str(ckpt), "type": a.type, "gguf_bytes": r["bytes"], "tensors": r["tensors"],
               "types": r["types"], "export_s": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
               "verify_s": time.perf_counter() - t1, "build_s": built, "max_block_error": v["max_block_error"],
               "header": v["header"], "notes": r["notes"]}
        if a.out is None:
            out.unlink(missing_ok=True)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['checkpoint']}: {res['type']} GGUF {res['gguf_bytes'] / 1e9:.3f} GB, {res['tensors']} tensors "
              f"{res['types']}; export {res['export_s']:.1f} s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB; "
              f"read back and checked every tensor in {res['verify_s']:.1f} s (build {res['build_s']:.1f} s)")
        for n in res["notes"]:
            print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
