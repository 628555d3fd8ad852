"""quantize_checkpoint and the `quantize` / `sizes` CLI verbs on the demo checkpoint: bad input (NaN weights,
odd group sizes, unknown phases, existing output, no space, interruptions), the input never modified, sizes as
predicted, and loading giving back exactly dequant(quant(W))."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fishlab import checkpoint as ckpt_mod
from fishlab.checkpoint import read_headers
from fishlab.cli import main
from fishlab.config import load_config
from fishlab.demo import build_demo_checkpoint, checkpoint_digest
from fishlab.manifest import linear_targets
from fishlab.metrics import weight_error
from fishlab.phases import PhaseError, load_phase, load_phases
from fishlab.quant import apply
from fishlab.quant.apply import QuantizeError, dequantized_state_dict, quantize_checkpoint, scheme_of
from fishlab.quant.primitives import dequantize_tensor, quantize_tensor

# phases with `spare:` decide their kept linears per checkpoint (resolved and tested in test_allocate.py)
PHASES = {p.name: p for p in load_phases() if not p.spare}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("quantize") / "demo")


@pytest.fixture(scope="module")
def source(demo) -> dict[str, torch.Tensor]:
    infos, _ = read_headers(demo)
    return dict(ckpt_mod.iter_tensors(infos))


def _copy(demo: Path, dst: Path) -> Path:
    shutil.copytree(demo, dst)
    return dst


def _leftovers(out: Path) -> list[str]:
    """Anything under the output name, or a hidden partial/old dir of it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def _targets(ckpt: Path, target: str, phase=None) -> list[str]:
    """The linears a target covers; with `phase`, the ones it quantizes (its overrides decide: a kept one is not)."""
    from fishlab.sizes import linear_name
    specs = linear_targets(load_config(ckpt).transformer, target)
    return [s.name for s in specs if phase is None or phase.tensor_phase(linear_name(s), True) is not None]


def _phase_yaml(tmp_path: Path, name: str = "g96", **fields) -> Path:
    d = {"phase": name, "method": "int", "bits": 4, "group_size": 96, "target": "slow", "scale_dtype": "float32"}
    d.update(fields)
    p = tmp_path / f"{name}.yaml"
    p.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in d.items()))
    return p


_REFERENCE: dict = {}     # (scheme, tensor) -> dequant(quant(W)); phases 1b/2a and 3a/3b share schemes


def _reference(name: str, w: torch.Tensor, scheme) -> torch.Tensor:
    key = (scheme, name, w.data_ptr())
    if key not in _REFERENCE:
        _REFERENCE[key] = dequantize_tensor(quantize_tensor(name, w, scheme))
    return _REFERENCE[key]


def _check_roundtrip(out: Path, source: dict, phase) -> None:
    """Every quantized tensor loads as exactly dequant(quant(W)); every other tensor is bit-identical."""
    loaded = dequantized_state_dict(out)
    targets = set(_targets(out, phase.target, phase))
    assert set(loaded) == set(source)
    scheme = scheme_of(phase)
    for name, w in source.items():
        got = loaded[name]
        assert got.shape == w.shape and got.dtype == w.dtype, name
        if name in targets:
            assert torch.equal(got, _reference(name, w, scheme)), name
        else:
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bfloat16 else got,
                               w.view(torch.uint8) if w.dtype == torch.bfloat16 else w), name


# ----------------------------------------------------------------------------------------------------
# every phase: input untouched, sizes as predicted, exact reload
# ----------------------------------------------------------------------------------------------------

def test_every_phase_input_unchanged_size_predicted_exact_reload(demo, source, tmp_path):
    before = checkpoint_digest(demo)
    assert sorted(PHASES) == ["1a", "1b", "2a", "2b", "2c", "3a", "3b", "q4_0", "q8_0", "spare-fast"]   # the plan + GGUF blocks
    for name, phase in PHASES.items():
        out = tmp_path / f"phase-{name}"
        r = quantize_checkpoint(demo, out, phase, with_metrics=(name == "1b"))
        q = json.loads((out / "quantization.json").read_text())
        assert q["measured_bytes"] == r["measured_bytes"]
        assert abs(q["measured_bytes"] / q["predicted"]["total"] - 1) < 0.01, name
        assert len(q["tensors"]) == len(_targets(demo, phase.target, phase))
        _check_roundtrip(out, source, phase)
        assert _leftovers(out) == [out.name]
        assert checkpoint_digest(demo) == before, f"phase {name} modified its input"


def test_blocked_metrics_equal_weight_error(demo, source, tmp_path):
    phase = PHASES["1b"]
    r = quantize_checkpoint(demo, tmp_path / "o", phase)
    saved = json.loads((tmp_path / "o" / apply.METRICS_FILE).read_text())["tensors"]
    scheme = scheme_of(phase)
    for name in _targets(demo, "slow"):
        qt = quantize_tensor(name, source[name], scheme)
        ref = weight_error(source[name], dequantize_tensor(qt, torch.float32), qt.scale)
        m = r["metrics"][name]
        for k in ("rel_fro", "snr_db", "cosine", "max_abs", "mean_abs", "zero_fraction", "weight_rms"):
            assert m[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), (name, k)
            assert saved[name][k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)
        assert m["hist"] == ref["hist"] and m["scale"] == ref["scale"]


@pytest.mark.parametrize("bits,group,chunk", [(4, 128, 1 << 12), (3, 96, 3000), (2, 64, 1), ("fp8", None, 5000)])
def test_quantize_blocked_is_quantize_tensor(bits, group, chunk):
    from fishlab.quant.primitives import Scheme
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(77, 200, generator=g) * 0.05).to(torch.bfloat16)
    scheme = Scheme("fp8", 8, None) if bits == "fp8" else Scheme("int", bits, group)
    qt, m = apply.quantize_blocked("w", w, scheme, with_metrics=True, chunk_elems=chunk)
    ref = quantize_tensor("w", w, scheme)
    assert torch.equal(qt.qdata, ref.qdata) and torch.equal(qt.scale, ref.scale)
    assert m["rel_fro"] == pytest.approx(weight_error(w, dequantize_tensor(ref, torch.float32))["rel_fro"], rel=1e-9)


def test_missing_codec_is_fine(demo, source, tmp_path):
    src = _copy(demo, tmp_path / "nocodec")
    (src / "codec.pth").unlink()
    out = tmp_path / "o"
    quantize_checkpoint(src, out, PHASES["1b"], with_metrics=False)
    assert not (out / "codec.pth").exists() and (out / "tokenizer.json").exists()
    q = json.loads((out / "quantization.json").read_text())
    assert abs(q["measured_bytes"] / q["predicted"]["total"] - 1) < 0.01


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

def _poison(ckpt: Path, name: str, values: dict[int, float]) -> None:
    """Rewrite elements of one bf16 tensor in place (flat index -> value)."""
    info = read_headers(ckpt)[0][name]
    with open(info.file, "r+b") as f:
        for i, v in values.items():
            f.seek(info.start + 2 * i)
            f.write(torch.tensor([v], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())


def test_nan_weight_refused_nothing_left_input_unchanged(demo, tmp_path, capsys):
    bad = _copy(demo, tmp_path / "bad")
    name = _targets(bad, "slow")[3]
    _poison(bad, name, {5: float("nan"), 900: float("inf")})
    before = checkpoint_digest(bad)
    out = tmp_path / "out"
    with pytest.raises(QuantizeError, match=name.replace(".", r"\.")) as ei:
        quantize_checkpoint(bad, out, PHASES["1b"])
    assert "1 NaN, 1 Inf" in str(ei.value) and "flat index 5" in str(ei.value)
    assert _leftovers(out) == []
    assert checkpoint_digest(bad) == before
    assert main(["quantize", "--phase", "1b", "--checkpoint", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "Traceback" not in err
    assert _leftovers(out) == []


def test_nan_in_non_target_is_copied(demo, tmp_path):
    """Only target weights are refused; a non-finite norm weight is stored as is (it is not quantized)."""
    bad = _copy(demo, tmp_path / "bad")
    norm = next(n for n in read_headers(bad)[0] if n.endswith("norm.weight"))
    _poison(bad, norm, {0: float("nan")})
    quantize_checkpoint(bad, tmp_path / "o", PHASES["1b"], with_metrics=False)
    assert torch.isnan(dequantized_state_dict(tmp_path / "o")[norm][0])


def test_group_size_not_dividing_rows(demo, source, tmp_path):
    phase = load_phase(_phase_yaml(tmp_path))
    cols = {source[n].shape[1] for n in _targets(demo, "slow")}
    assert any(c % 96 for c in cols)                     # 256 and 768 wide rows: last group shorter
    out = tmp_path / "o"
    quantize_checkpoint(demo, out, phase, with_metrics=False)
    q = json.loads((out / "quantization.json").read_text())
    assert any(d["group_padding"] > 0 for d in q["tensors"].values())
    for name, d in q["tensors"].items():
        assert d["n_groups"] == -(-d["cols"] // 96) and d["scale_shape"] == [d["rows"], d["n_groups"]]
    _check_roundtrip(out, source, phase)
    assert abs(q["measured_bytes"] / q["predicted"]["total"] - 1) < 0.01


def test_unknown_phase_and_unknown_target(demo, tmp_path, capsys):
    with pytest.raises(PhaseError, match="unknown phase 'nope'"):
        load_phase("nope")
    bad = _phase_yaml(tmp_path, "bad", target="attention")
    with pytest.raises(PhaseError, match="unknown target 'attention'") as ei:
        load_phase(bad)
    assert str(bad) in str(ei.value)
    out = tmp_path / "o"
    for phase in ("nope", str(bad)):
        assert main(["quantize", "--phase", phase, "--checkpoint", str(demo), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (str(bad) in err) if phase == str(bad) else ("known phases: 1a" in err)
    assert _leftovers(out) == []


def test_existing_output_refused_then_replaced_only_at_the_end(demo, tmp_path, monkeypatch):
    out = tmp_path / "o"
    quantize_checkpoint(demo, out, PHASES["1a"], with_metrics=False)
    first = checkpoint_digest(out)
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_checkpoint(demo, out, PHASES["1b"], with_metrics=False)
    assert checkpoint_digest(out) == first

    real, calls = apply.read_tensor, []

    def failing(info):
        calls.append(info.name)
        if len(calls) == 30:
            raise RuntimeError("disk on fire")
        return real(info)
    monkeypatch.setattr(apply, "read_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(demo, out, PHASES["1b"], overwrite=True, with_metrics=False)
    assert checkpoint_digest(out) == first and _leftovers(out) == [out.name]
    monkeypatch.undo()

    quantize_checkpoint(demo, out, PHASES["1b"], overwrite=True, with_metrics=False)
    assert json.loads((out / "quantization.json").read_text())["phase"]["name"] == "1b"
    assert _leftovers(out) == [out.name]


def test_not_enough_space_refused_before_writing(demo, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(apply.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "o"
    with pytest.raises(QuantizeError, match="not enough free space"):
        quantize_checkpoint(demo, out, PHASES["1b"])
    assert _leftovers(out) == []


def test_enospc_while_writing(demo, tmp_path, monkeypatch):
    real, shards = ckpt_mod.write_safetensors_streaming, []

    def writer(path, *a, **k):
        if shards:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, *a, **k)
        shards.append(path)
    monkeypatch.setattr(ckpt_mod, "write_safetensors_streaming", writer)
    out = tmp_path / "o"
    with pytest.raises(QuantizeError, match="no space left") as ei:
        quantize_checkpoint(demo, out, PHASES["1b"])
    assert "nothing was left" in str(ei.value) and len(shards) == 1
    assert _leftovers(out) == []


def test_interrupted_run_leaves_nothing_and_rerun_succeeds(demo, source, tmp_path, monkeypatch):
    real, calls = apply.read_tensor, []

    def interrupted(info):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real(info)
    monkeypatch.setattr(apply, "read_tensor", interrupted)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(demo, out, PHASES["2c"])
    assert _leftovers(out) == []
    monkeypatch.undo()
    quantize_checkpoint(demo, out, PHASES["2c"], with_metrics=False)
    _check_roundtrip(out, source, PHASES["2c"])


def test_stale_partial_dirs_from_a_hard_kill_are_removed(demo, tmp_path):
    out = tmp_path / "o"
    dead = tmp_path / ".o.partial-999999999-x1y2"          # no such process
    legacy = tmp_path / ".o.partial-k3j4l5"                 # old naming without a pid
    alive = tmp_path / f".o.partial-{os.getppid()}-abcd"   # a live process: maybe a concurrent run, kept
    other = tmp_path / ".other.partial-1-zz"                # another target's: not ours to remove
    for d in (dead, legacy, alive, other):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"half")
    quantize_checkpoint(demo, out, PHASES["1b"], with_metrics=False)
    assert not dead.exists() and not legacy.exists()
    assert alive.exists() and other.exists()
    assert (out / "quantization.json").exists()


def test_bad_checkpoint_and_missing_checkpoint(demo, tmp_path, capsys):
    bad = _copy(demo, tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    before = checkpoint_digest(bad)
    for src in (bad, tmp_path / "missing"):
        rc = main(["quantize", "--phase", "1b", "--checkpoint", str(src), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert ("truncated" in err) if src == bad else ("not found" in err)
    assert checkpoint_digest(bad) == before and _leftovers(tmp_path / "o") == []


# ----------------------------------------------------------------------------------------------------
# the CLI verbs
# ----------------------------------------------------------------------------------------------------

def test_cli_quantize(demo, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["quantize", "--phase", "1b", "--checkpoint", str(demo), "--out", str(out)]
    assert main(args) == 0
    so = capsys.readouterr().out
    assert "quantized 20 tensors" in so and "GB predicted" in so and "worst" in so
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--no-metrics"]) == 0
    assert "worst" not in capsys.readouterr().out
    assert not (out / apply.METRICS_FILE).exists()
    yaml_phase = _phase_yaml(tmp_path, "odd")
    assert main(["quantize", "--phase", str(yaml_phase), "--checkpoint", str(demo), "--out", str(tmp_path / "p"),
                 "--no-metrics"]) == 0
    assert "phase odd INT4 g96 slow" in capsys.readouterr().out


def test_cli_sizes(demo, tmp_path, capsys):
    js = tmp_path / "sizes.json"
    assert main(["sizes", "--preset", "s2-pro", "--json", str(js)]) == 0
    so = capsys.readouterr().out
    assert "1b INT4 g128 slow" in so and "GGUF Q4_K" in so and "bf16 (as shipped)" in so
    a = json.loads(js.read_text())
    assert a["model"] == "s2-pro" and len([r for r in a["estimates"] if r["kind"] == "phase"]) == 11      # the plan, q4_0 / q8_0, spare-fast, baicai-style
    assert main(["sizes", "--checkpoint", str(demo), "--scale-dtype", "float16"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["sizes", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["sizes", "--checkpoint", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (the cpu case is its twin)"))])
def test_quantize_on_a_device_equals_the_streaming_path(demo, tmp_path, device):
    """device=...: every tensor quantized (quantize_tensor) and measured (weight_error) whole on the device:
    the same bytes on disk as the CPU streaming path, the same metrics to float rounding."""
    phase = PHASES["2a"]
    ref = quantize_checkpoint(demo, tmp_path / "stream", phase)
    got = quantize_checkpoint(demo, tmp_path / "dev", phase, device=device)
    for f in sorted((tmp_path / "stream").iterdir()):
        if f.suffix == ".safetensors":
            assert (tmp_path / "dev" / f.name).read_bytes() == f.read_bytes(), f.name
    assert list(got["metrics"]) == list(ref["metrics"])
    for name, m in ref["metrics"].items():
        for k in ("rel_fro", "snr_db", "cosine", "max_abs", "mean_abs", "zero_fraction", "weight_rms"):
            assert got["metrics"][name][k] == pytest.approx(m[k], rel=1e-6, abs=1e-12), (name, k)
        if device == "cpu":
            assert got["metrics"][name]["hist"] == m["hist"]
