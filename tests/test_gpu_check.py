"""benchmarks/gpu_check.py, the script meant for a CUDA machine, runs green on the CPU at demo size, so it is not
broken when a GPU appears (it exercises the same sections: routes, eager + compiled decode, TTS, codec dtypes)."""
import json
import subprocess
import sys

from conftest import REPO

from fishlab.quant import cgemv


def test_gpu_check_runs_green_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                        "--json", str(out)], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["failed"] == 0
    rows = {(r["section"], r["item"].split(" [")[0]): r for r in data["rows"]}
    K = int(rows[("route", "int4_g128")]["item"].split("x")[-1].rstrip("]"))
    assert cgemv.available(), cgemv.reason()                  # the CPU run takes fishlab's own kernels
    int4 = "int4_gemv" if cgemv.int4_ok(K, 128) else "int4_mm"
    expect = {"int8_row": "int8_gemv", "int4_g128": int4, "fp8_row": "dense", "int3_g128": "dense",
              "int2_g64": "dense"}
    for scheme, route in expect.items():
        r = rows[("route", scheme)]
        assert r["route"] == route and r["rel_err_b1"] < 0.01, r
    assert {v: rows[("decode", v)]["routes"] for v in ("bf16", "int8", "int4")} == \
        {"bf16": "float", "int8": "int8_gemv", "int4": int4}
    d = rows[("decode", "int4")]      # compiled steps agree with eager ones (bf16 frames may part after a near tie)
    assert d["ok"] and d["step_rel_err"] < 0.06 and d["compiled_fr_s"] > 0 and 0 <= d["codes_agree"] <= 1, d
    assert rows[("tts", "int4 + codec fp32, sampled")]["finite"]
    assert rows[("codec", "bfloat16 vs float32")]["snr_db"] > 20
    assert "| section | item | result | check |" in p.stdout


def test_table_json_is_rewritten_after_every_row(tmp_path):
    """A run stopped part-way (the time limit of a lent GPU machine) still leaves its rows, marked incomplete;
    an exception becomes a FAILED row of its own."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    out = tmp_path / "sub" / "rows.json"
    table = gc.Table(out, {"device": "cpu"})
    table.add("route", "int8_row [8x8]", True, ms=0.1)
    first = json.loads(out.read_text())
    assert first["complete"] is False and first["failed"] == 0 and len(first["rows"]) == 1
    try:
        raise RuntimeError("no kernel for this shape")
    except RuntimeError as e:
        gc.error_row(table, "decode", "int4", e)
    table.write(complete=True)
    last = json.loads(out.read_text())
    assert last["complete"] is True and last["failed"] == 1 and last["info"] == {"device": "cpu"}
    assert last["rows"][1]["error"] == "RuntimeError: no kernel for this shape"
    assert not list(out.parent.glob("*.tmp*"))          # atomic writes leave no temp files
