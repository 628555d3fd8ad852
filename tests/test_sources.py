"""Imports: published quantizations read into fishlab's vocabulary. Small files in each format are built from
the demo checkpoint here, by writers that follow the documented layouts (docs/imports.md) independently of
the readers: GGUF with gguf-py (fishlab's own export and a hand-made K-quant file), FP8 (drbaph's
`X.weight` e4m3 + `X.weight.scale` [out, 1]) and GPTQ (qweight / qzeros / scales / g_idx with act-order).
Import -> dequantize must equal what was written, bit for bit. Then the workbook's rows: the import measured
by the real 10_phase / 90_summary notebooks (conftest.measured_run)."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fishlab import gguf_layout as L, spec, workbook
from fishlab.checkpoint import iter_tensors, read_headers
from fishlab.config import load_config, preset
from fishlab.demo import build_demo_checkpoint, checkpoint_digest
from fishlab.export.gguf import export_gguf
from fishlab.manifest import linear_targets, transformer_manifest
from fishlab.metrics import weight_error
from fishlab.model import load_transformer
from fishlab.model.codec import weight_norm
from fishlab.model.codec_load import read_codec_file, write_codec_pth
from fishlab.phases import load_phase, load_phases
from fishlab.runner import plan_run
from fishlab.sources import ImportPhase, SourceError, import_checkpoint, open_source, read_import

from conftest import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("sources") / "demo")


@pytest.fixture(scope="module")
def base(demo):
    infos, _ = read_headers(demo)
    return {n: t.float() for n, t in iter_tensors(infos)}


def linears(cfg):
    return {s.name for s in linear_targets(cfg.transformer, "all")}


# ----------------------------------------------------------------------------------------------------
# writers of the published layouts (test-side, from the docs)
# ----------------------------------------------------------------------------------------------------

def write_fp8(demo, base, out, names="internal", single_file=False):
    """drbaph-style: every linear X.weight as float8_e4m3fn + X.weight.scale float32 [out, 1] (row amax /
    448), the rest bfloat16, one `_buf.` buffer, codec.pth in bfloat16. Returns the expected float32 tensors."""
    cfg = load_config(demo)
    lin = linears(cfg)
    tensors, expected = {}, {}
    for s in transformer_manifest(cfg.transformer):
        key = s.internal if names == "internal" else s.name
        w = base[s.name]
        if s.name in lin:
            scale = (w.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
            q = (w / scale).to(torch.float8_e4m3fn)
            tensors[key], tensors[key + ".scale"] = q, scale
            expected[s.name] = q.float() * scale
        else:
            tensors[key] = w.to(torch.bfloat16)
            expected[s.name] = tensors[key].float()
    tensors["_buf.freqs_cis"] = torch.zeros(16, 2)
    out.mkdir(parents=True)
    target = out / ("s2-pro-fp8.safetensors" if single_file else "model.safetensors")
    save_file(tensors, str(target))
    codec = {k: v.to(torch.bfloat16) for k, v in read_codec_file(demo / spec.CODEC_FILE).items()}
    if not single_file:
        write_codec_pth(codec, out / spec.CODEC_FILE)
        shutil.copy(demo / spec.CONFIG_FILE, out / spec.CONFIG_FILE)
    return (target if single_file else out), expected, codec


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] small ints -> int32 [R * bits / 32, C], 32/bits consecutive rows per word, lowest bits first."""
    per = 32 // bits
    v = v.to(torch.int64).reshape(-1, per, v.shape[1])
    word = sum(v[:, j] << (bits * j) for j in range(per)).contiguous()
    return torch.from_numpy(np.ascontiguousarray(word.numpy() & 0xFFFFFFFF).astype(np.uint32).view(np.int32))


def write_gptq(demo, base, out, fmt="gptq", stored_zero=7, in_config_json=False, group=32, seed=0):
    """Every linear as GPTQ int4, group 32, act-order (g_idx from a random column order), symmetric (zero 8,
    stored as `stored_zero`), fp16 scales; the rest bfloat16. Returns the expected float32 tensors."""
    cfg = load_config(demo)
    lin = linears(cfg)
    tensors, expected = {}, {}
    g = torch.Generator().manual_seed(seed)
    for s in transformer_manifest(cfg.transformer):
        w = base[s.name]
        if s.name not in lin:
            tensors[s.name] = w.to(torch.bfloat16)
            expected[s.name] = tensors[s.name].float()
            continue
        out_f, in_f = w.shape
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // group
        wt = w.t()
        amax = torch.stack([wt[g_idx == k].abs().amax(0) for k in range(in_f // group)])
        scales = (amax / 7).clamp_min(1e-6).half()
        sc = scales.float()[g_idx.long()]
        q = (wt / sc).round().add(8).clamp(0, 15).to(torch.int64)
        x = s.name.removesuffix(".weight")
        tensors[x + ".qweight"] = _pack_rows(q, 4)
        zeros = torch.full((in_f // group, out_f), stored_zero)              # packed along the output dim
        tensors[x + ".qzeros"] = _pack_rows(zeros.t(), 4).t().contiguous()
        tensors[x + ".scales"] = scales
        tensors[x + ".g_idx"] = g_idx
        expected[s.name] = ((q - 8).float() * sc).t().contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    qc = {"bits": 4, "group_size": group, "desc_act": True, "sym": True, "quant_method": "gptq",
          "checkpoint_format": fmt}
    conf = json.loads((demo / spec.CONFIG_FILE).read_text())
    if in_config_json:
        conf["quantization_config"] = qc
    else:
        (out / "quantize_config.json").write_text(json.dumps(qc))
    (out / spec.CONFIG_FILE).write_text(json.dumps(conf))
    return out, expected


def write_kquant_gguf(demo, base, out):
    """A GGUF in the s2.cpp layout written with gguf-py directly: linears as K-quants (Q4_K, w2 as Q6_K) with
    random codes and sane block scales, the rest F32; no codec section. Returns the expected tensors."""
    cfg = load_config(demo)
    lin = linears(cfg)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(out, spec.GGUF_ARCH)
    for k, v, vt in L.transformer_keys(cfg.transformer):
        w.add_key_value(k, v, vt)
    expected = {}
    for s in transformer_manifest(cfg.transformer):
        name = s.internal
        if s.name in lin:
            t = gguf.GGMLQuantizationType.Q6_K if s.projection == "w2" else gguf.GGMLQuantizationType.Q4_K
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            rows, cols = s.shape
            raw = rng.integers(0, 256, (rows, cols // bs, ts), dtype=np.uint8)
            d = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
            if t == gguf.GGMLQuantizationType.Q4_K:
                raw[..., 0:2] = d                      # d, then dmin
                raw[..., 2:4] = d
            else:
                raw[..., ts - 2:] = d                  # Q6_K keeps d last
            raw = raw.reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=t)
            expected[s.name] = torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(s.shape).copy())
        else:
            x = base[s.name].numpy()
            w.add_tensor(name, x)
            expected[s.name] = base[s.name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out, expected


# ----------------------------------------------------------------------------------------------------
# readers: import -> dequantize equals what was written
# ----------------------------------------------------------------------------------------------------

def _same(source, expected):
    assert set(expected) <= set(source.stored)
    for n, want in expected.items():
        got = source.get(n)
        assert got.dtype == torch.float32 and torch.equal(got, want), n


def test_gguf_exported_by_fishlab(demo, tmp_path):
    path = export_gguf(demo, tmp_path / "d.gguf", "q8_0")["path"]
    src = open_source("gguf", tmp_path / "d.gguf", load_config(demo))
    r = gguf.GGUFReader(path)
    by = {t.name: t for t in r.tensors}
    expected = {s.name: torch.from_numpy(gguf.quants.dequantize(by[s.internal].data, by[s.internal].tensor_type)
                                         .reshape(s.shape).astype(np.float32))
                for s in transformer_manifest(preset("demo").transformer)}
    _same(src, expected)
    assert src.quantized == {s.name for s in transformer_manifest(preset("demo").transformer) if len(s.shape) == 2}
    codec = src.codec()               # unfolded: g * v / ||v|| is the file's F16 weight again
    folded = L.codec_tensors(preset("demo").codec)
    for ct in folded:
        file_w = torch.from_numpy(gguf.quants.dequantize(by[ct.gguf_name].data, by[ct.gguf_name].tensor_type)
                                  .reshape(ct.shape).astype(np.float32))
        got = weight_norm(codec[ct.sources[0]], codec[ct.sources[1]]) if ct.folded else codec[ct.sources[0]]
        torch.testing.assert_close(got, file_w, rtol=2e-7, atol=1e-9)


def test_gguf_with_k_quants(demo, base, tmp_path):
    path, expected = write_kquant_gguf(demo, base, tmp_path / "k.gguf")
    src = open_source("gguf", path, load_config(demo))
    _same(src, expected)
    assert {src.stored[n] for n in linears(load_config(demo))} == {"Q4_K", "Q6_K"}
    assert src.codec() is None
    with pytest.raises(SourceError, match="another model than the base"):
        open_source("gguf", path, preset("s2-pro"))


@pytest.mark.parametrize("names,single", [("internal", False), ("hf", True)])
def test_fp8_as_drbaph_publishes_it(demo, base, tmp_path, names, single):
    path, expected, codec = write_fp8(demo, base, tmp_path / "fp8", names, single)
    src = open_source("fp8", path, load_config(demo))
    _same(src, expected)
    assert src.quantized == linears(load_config(demo))
    assert any("_buf." in n for n in src.notes)
    if single:
        assert src.codec() is None
    else:
        got = src.codec()
        assert all(torch.equal(got[k], v.float()) for k, v in codec.items())
        assert src.codec_bytes == (path / spec.CODEC_FILE).stat().st_size


@pytest.mark.parametrize("fmt,stored_zero,in_config", [("gptq", 7, False), ("gptq_v2", 8, True), ("gptq", 8, False)])
def test_gptq_with_act_order(demo, base, tmp_path, fmt, stored_zero, in_config):
    path, expected = write_gptq(demo, base, tmp_path / "gptq", fmt, stored_zero, in_config)
    src = open_source("gptq", path, load_config(demo))
    _same(src, expected)
    lin = linears(load_config(demo))
    assert src.quantized == lin and {src.stored[n] for n in lin} == {"gptq int4 g32 act-order sym"}
    said = any("gptq_v2 convention" in n for n in src.notes)
    assert said == (fmt == "gptq" and stored_zero == 8)      # v2 zeros under "gptq": read right, and said


def test_readers_name_what_is_wrong(demo, base, tmp_path):
    path, _, _ = write_fp8(demo, base, tmp_path / "a", "internal", True)
    from safetensors.torch import load_file
    t = load_file(str(path))
    t.pop("layers.0.attention.wo.weight.scale")
    t["not.a.tensor"] = torch.zeros(1)
    save_file(t, str(tmp_path / "b.safetensors"))
    with pytest.raises(SourceError, match="not.a.tensor"):
        open_source("fp8", tmp_path / "b.safetensors", load_config(demo))
    t.pop("not.a.tensor")
    save_file(t, str(tmp_path / "c.safetensors"))
    with pytest.raises(SourceError, match="layers.0.attention.wo.weight is float8_e4m3fn but has no"):
        open_source("fp8", tmp_path / "c.safetensors", load_config(demo))
    gpath, _ = write_gptq(demo, base, tmp_path / "g", group=64)
    (gpath / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": True}))
    with pytest.raises(SourceError, match="expected .* at 4 bits, group size 32"):
        open_source("gptq", gpath, load_config(demo))


# ----------------------------------------------------------------------------------------------------
# the applier: a plain fishlab checkpoint directory, measured against the base
# ----------------------------------------------------------------------------------------------------

def test_import_checkpoint_writes_a_loadable_measured_checkpoint(demo, base, tmp_path):
    path, expected = write_gptq(demo, base, tmp_path / "gptq")
    before = checkpoint_digest(demo), checkpoint_digest(path)
    ph = ImportPhase("gptq-demo", "gptq", str(path), "demo GPTQ", "test")
    r = import_checkpoint(ph, demo, tmp_path / "imported")
    out = tmp_path / "imported"
    infos, _ = read_headers(out)
    got = dict(iter_tensors(infos))
    assert all(torch.equal(got[n], expected[n]) for n in expected)        # float32 on the demo: exact
    lin = linears(load_config(demo))
    assert set(r["metrics"]) == lin and all(0 < m["rel_fro"] < 0.5 for m in r["metrics"].values())
    n = "text_model.model.layers.0.attention.wqkv.weight"            # block-wise = metrics.weight_error
    ref = weight_error(base[n], expected[n])
    for k in ("rel_fro", "snr_db", "cosine", "max_abs", "zero_fraction"):
        assert r["metrics"][n][k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    info = read_import(out)
    assert info["file"]["bytes"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert info["codec"] == "from the base checkpoint" and info["stored"]["gptq int4 g32 act-order sym"] == len(lin)
    assert json.loads((out / "quantization_metrics.json").read_text())["tensors"].keys() == lin
    model = load_transformer(out, dtype=torch.float32)      # a plain checkpoint: the ordinary loader
    assert torch.equal(model.state_dict()["layers.0.attention.wqkv.weight"],
                       expected["text_model.model.layers.0.attention.wqkv.weight"])
    assert (checkpoint_digest(demo), checkpoint_digest(path)) == before


def test_import_params_files(tmp_path):
    community = REPO / "params" / "community"
    imports = [p for p in load_phases(community, imports=True) if isinstance(p, ImportPhase)]
    assert {p.format for p in imports} == {"gguf", "fp8", "gptq"}
    plan = plan_run(community / "s2pro.yaml", notebooks_dir=REPO / "notebooks", renders_dir=tmp_path)
    names = {r.name for r in plan.reports}
    assert {f"10_phase-{p.name}" for p in imports} | {"10_phase-1a", "10_phase-3b", "90_summary"} <= names
    rep = next(r for r in plan.reports if r.name == f"10_phase-{imports[0].name}")
    assert rep.parameters["source"] == imports[0].format and rep.parameters["path"] == imports[0].path
    (tmp_path / "x.yaml").write_text("phase: x\nsource: onnx\npath: a\n")
    with pytest.raises(Exception, match="source must be one of gguf, fp8, gptq"):
        load_phase(tmp_path / "x.yaml")
    ph = load_phase(next(iter(sorted(community.glob("gguf-*.yaml")))))
    with pytest.raises(FileNotFoundError, match="path not found"):
        ph.resolved_path()


# ----------------------------------------------------------------------------------------------------
# the workbook's rows (the real notebooks, once per session)
# ----------------------------------------------------------------------------------------------------

def test_an_import_is_a_phase_like_row_in_every_report(measured_run):
    assert measured_run["result"].ok, [(r.name, r.status, r.reason) for r in measured_run["result"].reports]
    run = measured_run["run"]
    side = json.loads((run / "10_phase-gguf-q4_0.metrics.json").read_text())
    assert side["label"] == "gguf-q4_0 GGUF import" and side["import"]["format"] == "gguf"
    assert side["sizes"]["measured_bytes"] == measured_run["gguf"].stat().st_size
    assert 0 < side["sizes"]["measured_vs_predicted_pct"] < 2          # the GGUF header and padding
    assert side["errors"]["tensors"] == len(transformer_manifest(preset("demo").transformer)) - \
        sum(1 for s in transformer_manifest(preset("demo").transformer) if len(s.shape) == 1)
    lst = side["listening"]
    assert 0 <= lst["slow_top1"] <= 1 and lst["slow_kl_mean"] >= 0 and lst["speaker_clone_vs_reference"] is not None
    assert "wer" in side["listening_detail"]
    results = json.loads((run / "all_results.json").read_text())
    assert set(results["phases"]) == {"1b", "gguf-q4_0"}
    assert "gguf-q4_0" in results["pareto_size_vs_weight_error"] or "1b" in results["pareto_size_vs_weight_error"]
    report = (run / "10_phase-gguf-q4_0.html").read_text()
    assert "transformer tensors stored as" in report and "Q4_0" in report and "imported in" in report
    summary = (run / "90_summary.html").read_text()
    assert "gguf-q4_0 GGUF import" in summary and "Size vs KL" in summary
    assert "gguf-q4_0 GGUF import" in (run / "20_layer_errors.html").read_text()   # heatmaps, histograms, scatter
    assert (run / "30_listen.html").read_text().count("<audio") == 2 * 3 + 1      # base + 1b + import, + reference
    q = measured_run["work"] / "import-gguf-q4_0"
    pairs = workbook.weight_pairs(measured_run["src"], q, "text_model.model.layers.0.attention.wo.weight", n=50)
    assert len(pairs["w"]) == 50 and pairs["w"] != pairs["w_hat"]
