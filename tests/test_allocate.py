"""Sensitivity per group of linears (on the trained proxy model) and the bit allocator that turns it into a
phase file."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fishlab import allocate as A
from fishlab import sensitivity as S
from fishlab import textdata
from fishlab.config import load_config, preset
from fishlab.model.load import load_transformer
from fishlab.phases import Phase, PhaseError, load_phase
from fishlab.quant.apply import quantize_checkpoint
from fishlab.sizes import phase_estimate
from fishlab.trained import trained_checkpoint
from fishlab.trained_track import _tokenizer

DAMAGED = "layers.13.feed_forward.w2"


@pytest.fixture(scope="module")
def smol():
    return trained_checkpoint()


@pytest.fixture(scope="module")
def measured(smol, tmp_path_factory):
    """Sensitivity of the trained model at INT3 g128 (phase 2c) and at a copy of 2c's checkpoint in which one
    linear's scales are multiplied by 3 (a deliberately damaged layer), groups of 10 layers, on calibration
    text."""
    d = tmp_path_factory.mktemp("sens")
    ph = load_phase("2c")
    q = d / "2c"
    quantize_checkpoint(smol, q, ph, with_metrics=False)
    bad = d / "damaged"
    shutil.copytree(q, bad)
    f = bad / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    t = load_file(str(f))
    key = f"text_model.model.{DAMAGED}.weight.scale"
    assert key in t, sorted(t)[:8]
    t[key] = t[key] * 3
    save_file(t, str(f), metadata=meta)
    base = load_transformer(smol, dtype=torch.float32)
    tok = _tokenizer(smol)
    tokens = textdata.token_chunks(tok.encode(textdata.text("calibration")).ids, 1, 128, None)
    groups = S.linear_groups(base.cfg, 10)
    damaged = Phase.from_dict({"phase": "damaged", **{k: v for k, v in ph.to_dict().items() if k != "name"}})
    data = S.measure(base, {"2c": q, "damaged": bad}, {"2c": ph, "damaged": damaged}, tokens, 64, groups,
                     text=textdata.text_info("calibration"))
    return data, load_config(smol)


def test_groups_cover_each_target_linear_once():
    cfg = preset("s2-pro")
    g = S.linear_groups(cfg, 6, "all")
    names = [n for x in g for n in x["linears"]]
    assert len(names) == len(set(names)) == 36 * 5 + 4 * 5 + 1
    assert g[0]["name"] == "layers 0-5 wqkv" and g[0]["linears"][5] == "layers.5.attention.wqkv"
    assert g[-1]["name"] == "fast_output" and g[-2]["name"] == "fast layers 0-3 w3"
    one = S.linear_groups(cfg, 1, "slow")
    assert len(one) == 180 and one[3] == dict(one[3], name="layer 0 w2", linears=["layers.0.feed_forward.w2"])
    with pytest.raises(ValueError, match="layers_per_group"):
        S.linear_groups(cfg, 0)


def test_sensitivity_ranks_a_deliberately_damaged_layer_first(measured):
    data, _ = measured
    assert data["format"] == S.FORMAT and data["tokens"]["text"]["set"] == "calibration"
    assert len(data["rows"]) == 2 * 15 and all(r["slow_kl_mean"] > 0 for r in data["rows"])
    top, kl = S.ranking(data, "damaged")[0]
    assert top == "layers 10-19 w2"
    assert kl > 2 * S.table(data)[top]["2c"]                 # the damage, not the group, puts it first
    assert S.ranking(data, "2c")[0][0] != top or S.ranking(data, "2c")[0][1] < kl / 2
    hm = S.heatmap_rows(data, "2c")
    assert len(hm) == 150 and {r["projection"] for r in hm} == {"wqkv", "wo", "w1", "w2", "w3"}


def _fake(cfg, kls: dict[str, list[float]], phases: dict[str, Phase], layers_per_group: int = 10,
          target: str = "slow") -> dict:
    groups = S.linear_groups(cfg, layers_per_group, target)
    rows = [{"group": g["name"], "precision": p, "slow_kl_mean": kls[p][i]}
            for p in kls for i, g in enumerate(groups)]
    return {"format": S.FORMAT, "model": cfg.name, "groups": groups, "rows": rows,
            "precisions": {n: ph.to_dict() for n, ph in phases.items()}}


def test_allocator_is_optimal_within_the_budget_and_writes_a_loadable_phase_file(smol, tmp_path):
    cfg = load_config(smol)
    phases = {n: load_phase(n) for n in ("2b", "1b", "2c")}       # INT8 row, INT4 g128, INT3 g128
    g = torch.Generator().manual_seed(0)
    n = len(S.linear_groups(cfg, 10))
    kl = {"2b": (torch.rand(n, generator=g) * 1e-4).tolist(),
          "1b": (torch.rand(n, generator=g) * 1e-2).tolist(),
          "2c": (torch.rand(n, generator=g) * 5e-2).tolist()}
    data = _fake(cfg, kl, phases)
    alloc = A.allocate(data, cfg, budget_phase=phases["1b"])
    budget = phase_estimate(cfg, phases["1b"], codec_dtype=None).transformer_bytes
    assert alloc.transformer_bytes <= budget and alloc.linear_bytes <= alloc.budget_bytes
    # brute force over every assignment of 15 groups x 4 options is too many; check on the first 6 groups with the
    # rest fixed as the allocator chose them: no other choice for those 6 fits and predicts less
    names = [x["name"] for x in data["groups"]]
    opts = ["2b", "1b", "2c", "bf16"]
    cost = {(gn, o): A.group_bytes(cfg, grp, phases.get(o)) for grp in data["groups"] for gn in [grp["name"]] for o in opts}
    rest = sum(cost[(gn, alloc.choice[gn])] for gn in names[6:])
    best = min((sum(kl[o][i] if o != "bf16" else 0 for i, o in enumerate(c)), c) for c in itertools.product(opts, repeat=6)
               if rest + sum(cost[(names[i], o)] for i, o in enumerate(c)) <= alloc.budget_bytes)
    mine = sum(kl[alloc.choice[gn]][i] if alloc.choice[gn] != "bf16" else 0 for i, gn in enumerate(names[:6]))
    assert mine <= best[0] * (1 + 1e-3) + 1e-12
    # with every group at INT4, KL would be the sum of the 1b column; the allocator does better at that size
    assert alloc.predicted_kl < sum(kl["1b"])

    keys = A.allocation_phase(data, alloc, "mix-test", target="slow", budget={"phase": "1b"})
    path = A.write_phase_file(tmp_path / "mix-test.yaml", keys)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temp file left
    ph = load_phase(path)
    assert ph.name == "mix-test" and ph.allocation["predicted_kl"] == pytest.approx(alloc.predicted_kl)
    for grp in data["groups"]:
        for lin in grp["linears"]:
            t = ph.tensor_phase(lin, True)
            c = alloc.choice[grp["name"]]
            if c == "bf16":
                assert t is None
            else:
                assert (t.method, t.bits, t.group_size) == (phases[c].method, phases[c].bits, phases[c].group_size)
    # the file is plain YAML a person can read
    assert yaml.safe_load(path.read_text())["allocation"]["budget"] == {"phase": "1b"}


def test_allocator_budgets_and_errors_name_the_problem(smol, tmp_path):
    cfg = load_config(smol)
    phases = {n: load_phase(n) for n in ("1b", "2c")}
    n = len(S.linear_groups(cfg, 10))
    data = _fake(cfg, {"1b": [1e-3] * n, "2c": [1e-2] * n}, phases)
    groups = data["groups"]
    int3 = 8 * sum(A.group_bytes(cfg, g, phases["2c"]) for g in groups) / sum(g["params"] for g in groups)
    assert 3.25 < int3 < 3.3                           # 3 + a float32 scale per 128 (a shorter 5th group of 576)
    a = A.allocate(data, cfg, budget_bits=int3 + 1e-3, keep=False)
    assert set(a.choice.values()) == {"2c"} and 8 * a.linear_bytes / a.params <= int3 + 1e-3
    big = A.allocate(data, cfg, budget_gb=10.0)
    assert set(big.choice.values()) == {"bf16"} and big.predicted_kl == 0
    with pytest.raises(A.AllocationError, match="no phase to write"):
        A.allocation_phase(data, big, "x")
    with pytest.raises(A.AllocationError, match="too small"):
        A.allocate(data, cfg, budget_bits=2.0)
    with pytest.raises(A.AllocationError, match="exactly one budget"):
        A.allocate(data, cfg, budget_bits=4, budget_gb=1)
    with pytest.raises(A.AllocationError, match=r"candidates \['3a'\] were not measured"):
        A.allocate(data, cfg, budget_bits=4, candidates=["3a"])
    with pytest.raises(A.AllocationError, match="not in the model"):
        nd = len(S.linear_groups(preset("demo"), 1, "all"))          # S2 Pro's fast AR is not in a text LM
        A.allocate(_fake(preset("demo"), {"1b": [1e-3] * nd, "2c": [1e-2] * nd}, phases, 1, "all"), cfg, budget_bits=4)
    with pytest.raises(A.AllocationError, match="not sensitivity data"):
        A.allocate({"format": "x"}, cfg, budget_bits=4)
    with pytest.raises(PhaseError, match=r"\.yaml or \.yml"):
        A.write_phase_file(tmp_path / "x.json", {"phase": "x"})
    assert not list(tmp_path.iterdir())


def test_allocation_from_measured_sensitivity_avoids_the_damaged_layer(measured):
    data, cfg = measured
    a = A.allocate(data, cfg, budget_bits=4.4, candidates=["damaged"])        # the damaged scheme or bf16
    assert a.choice["layers 10-19 w2"] == "bf16"                              # the money goes where it hurts
    assert json.loads(json.dumps(a.choice)) == a.choice


def test_allocate_cli_writes_the_phase_file_and_says_what_is_wrong(smol, tmp_path, capsys):
    from fishlab.cli import main
    cfg = load_config(smol)
    phases = {n: load_phase(n) for n in ("1b", "2c")}
    n = len(S.linear_groups(cfg, 10))
    data = dict(_fake(cfg, {"1b": [1e-3] * n, "2c": [1e-2] * (n - 1) + [1e-4]}, phases), checkpoint=str(smol))
    (tmp_path / "s.json").write_text(json.dumps(data))
    out = tmp_path / "mix.yaml"
    assert main(["allocate", "--sensitivity", str(tmp_path / "s.json"), "--budget-phase", "1b", "--name", "mix",
                 "--out", str(out)]) == 0
    ph = load_phase(out)
    assert ph.tensor_phase("layers.29.feed_forward.w3", True).bits == 3      # the cheap group goes to INT3
    assert "predicted KL" in capsys.readouterr().out
    assert main(["allocate", "--sensitivity", str(tmp_path / "s.json"), "--budget-bits", "1", "--name", "x",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "too small" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()


def test_an_allocated_mixed_precision_file_quantizes_reloads_and_is_the_size_it_predicted(smol, tmp_path):
    from fishlab.quant.apply import load_quantized_tensors
    cfg = load_config(smol)
    phases = {n: load_phase(n) for n in ("2b", "1b", "2c")}
    n = len(S.linear_groups(cfg, 10))
    kl = {"2b": [1e-5] * n, "1b": [1e-3] * n, "2c": [1e-2] * n}
    kl["2c"][2:5] = [1e-6] * 3                      # layers 0-9 w1 / w2 / w3 cheap at INT3 ...
    kl["1b"][1] = kl["2c"][1] = 1.0                 # ... which pays for layers 0-9 wo at INT8
    data = _fake(cfg, kl, phases)
    a = A.allocate(data, cfg, budget_phase=phases["1b"])
    assert set(a.choice.values()) == {"2b", "1b", "2c"} and a.choice["layers 0-9 wo"] == "2b"
    path = A.write_phase_file(tmp_path / "mix.yaml", A.allocation_phase(data, a, "mix"))
    ph = load_phase(path)
    assert phase_estimate(cfg, ph, codec_dtype=None).transformer_bytes == a.transformer_bytes   # one byte count
    r = quantize_checkpoint(smol, tmp_path / "q", ph, with_metrics=False)
    tensors, _ = load_quantized_tensors(tmp_path / "q")
    choice_of = {lin: a.choice[g["name"]] for g in data["groups"] for lin in g["linears"]}
    for lin, c in choice_of.items():
        t = tensors[f"text_model.model.{lin}.weight"]
        if c == "bf16":
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32      # kept as stored
        else:
            assert (t.scheme.bits, t.scheme.group_size) == (phases[c].bits, phases[c].group_size), lin
    model = load_transformer(tmp_path / "q", dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    assert torch.isfinite(model(ids).logits).all()
    assert r["predicted"]["transformer"] > 0


def test_spare_the_most_sensitive_w2_and_wo_baicai_style(smol, tmp_path):
    from fishlab.cli import main
    cfg = load_config(smol)
    groups = S.linear_groups(cfg, 1)
    kl = [0.01 * (1 + (i * 7919) % 97) for i in range(len(groups))]          # a fixed, uneven ranking
    data = dict(_fake(cfg, {"2c": kl}, {"2c": load_phase("2c")}, 1), checkpoint=str(smol))
    (tmp_path / "s.json").write_text(json.dumps(data))
    out = tmp_path / "baicai-style.yaml"
    assert main(["allocate", "--sensitivity", str(tmp_path / "s.json"), "--spare", "w2=7", "wo=2", "--like", "q4_0",
                 "--name", "baicai-style", "--out", str(out)]) == 0
    ph = load_phase(out)
    assert (ph.bits, ph.group_size, len(ph.overrides)) == (4, 32, 9) and all(o["keep"] for o in ph.overrides)
    for proj, n in (("w2", 7), ("wo", 2)):
        ranked = sorted((v, g["linears"][0]) for g, v in zip(groups, kl) if g["projection"] == proj)[::-1]
        assert sorted(o["match"] for o in ph.overrides if o["match"].endswith(proj)) == sorted(x for _, x in ranked[:n])
    wide = dict(_fake(cfg, {"2c": [0.1] * 15}, {"2c": load_phase("2c")}, 10))
    with pytest.raises(A.AllocationError, match="per linear"):
        A.spare_most_sensitive(wide, load_phase("q4_0"), {"w2": 7}, "x")


def test_a_spare_phase_file_is_resolved_on_the_checkpoint_it_quantizes(smol, tmp_path):
    """`spare: {w2: 2, wo: 1}` (the baicai-style preset's key, here on INT3 g128 RTN for speed): run_phase ranks
    the trained model's slow-AR w2 / wo by measured ΔKL, keeps the top ones as stored, records the choice, is the
    size the unresolved phase predicts, and is reused the second time."""
    from fishlab.quant.apply import read_quantization
    from fishlab.workbook import run_phase
    cfg = load_config(smol)
    ph = Phase.from_dict({"phase": "spare-test", "method": "int", "bits": 3, "group_size": 128, "target": "slow",
                          "spare": {"w2": 2, "wo": 1}})
    with pytest.raises(PhaseError, match="resolved per checkpoint"):
        ph.tensor_phase("layers.0.feed_forward.w2", True)
    r = run_phase(smol, ph, tmp_path)
    assert not r["reused"]
    q = read_quantization(r["path"])
    rec = q["phase"]["allocation"]
    assert rec["from"] == ph.to_dict() and rec["like"] == "spare-test-unspared"
    sens = json.loads((tmp_path / "spare-test.sensitivity.json").read_text())
    assert len(sens["groups"]) == 2 * cfg.transformer.n_layer and all(r_["slow_kl_mean"] > 0 for r_ in sens["rows"])
    by = {g["name"]: g for g in sens["groups"]}
    for proj, n in (("w2", 2), ("wo", 1)):
        ranked = [by[g]["linears"][0] for g, _ in S.ranking(sens, "spare-test-unspared") if by[g]["projection"] == proj]
        assert [x["linear"] for x in rec["spared"][proj]] == ranked[:n]
    kept = {o["match"] for o in q["phase"]["overrides"] if o.get("keep")}
    assert len(kept) == 3
    stored = load_file(str(Path(r["path"]) / "model.safetensors"))
    for name in kept:
        assert f"text_model.model.{name}.weight" in stored                   # as stored, no .qdata
        assert f"text_model.model.{name}.weight.qdata" not in stored
    assert sum(k.endswith(".qdata") for k in stored) == 5 * cfg.transformer.n_layer - 3
    resolved = load_phase(tmp_path / "spare-test.resolved.yaml")
    assert resolved.to_dict() == dict(q["phase"], source=resolved.source)
    # the unresolved phase's size (stand-in linears of the same shapes) is the resolved phase's, byte for byte
    unspared = Phase.from_dict({k: v for k, v in ph.to_dict().items() if k not in ("name", "source", "spare")}
                               | {"phase": "unspared"})
    spared, exact, plain = (phase_estimate(cfg, p, codec_dtype=None).transformer_bytes for p in (ph, resolved, unspared))
    assert spared == exact > plain
    assert run_phase(smol, ph, tmp_path)["reused"]


def test_spare_keys_are_checked_and_the_preset_file_loads():
    for bad in ({"w9": 2}, {"w2": 0}, {"w2": "7"}, ["w2"]):
        with pytest.raises(PhaseError, match="spare must map projections"):
            Phase.from_dict({"phase": "x", "method": "int", "bits": 4, "group_size": 32, "target": "slow", "spare": bad})
    b = load_phase("baicai-style")
    assert (b.bits, b.group_size, b.quantizer, b.quantizer_args, b.spare) == (4, 32, "gptq", {"act_order": True},
                                                                            {"w2": 7, "wo": 2})
    assert "spare" not in load_phase("1b").to_dict()        # phases without it keep their earlier records
    s2 = preset("s2-pro")
    like = Phase.from_dict({k: v for k, v in b.to_dict().items() if k not in ("name", "source", "spare")}
                           | {"phase": "like"})
    per_w2 = 2560 * 9728 * 2 - (9728 // 32) * 2560 * 2 - 2560 * 9728 // 2   # bf16 minus INT4 g32 (fp16 scales)
    per_wo = 4096 * 2560 * 2 - (4096 // 32) * 2560 * 2 - 4096 * 2560 // 2
    assert (phase_estimate(s2, b).transformer_bytes - phase_estimate(s2, like).transformer_bytes
            == 7 * per_w2 + 2 * per_wo)


def test_fishlab_quantize_resolves_spare_on_an_s2pro_shaped_checkpoint(tmp_path, capsys):
    """The CLI on the synthetic S2 Pro demo (4 slow layers, calibration = the base model's own frames): a spare
    asking for more w2 than the model has keeps all of them and says so."""
    from fishlab.cli import main
    from fishlab.demo import build_demo_checkpoint
    from fishlab.quant.apply import read_quantization
    demo = build_demo_checkpoint(tmp_path / "demo")
    f = tmp_path / "sp.yaml"
    f.write_text("phase: sp\nmethod: int\nbits: 4\ngroup_size: 32\ntarget: slow\nspare: {w2: 9, wo: 1}\n")
    out = tmp_path / "out"
    assert main(["quantize", "--checkpoint", str(demo), "--phase", str(f), "--out", str(out), "--no-metrics"]) == 0
    err = capsys.readouterr().err
    assert "keeping all of those" in err and "phase sp: keeps" in err
    q = read_quantization(out)
    kept = sorted(o["match"] for o in q["phase"]["overrides"] if o.get("keep"))
    assert kept == sorted([f"layers.{i}.feed_forward.w2" for i in range(4)]
                          + [x["linear"] for x in q["phase"]["allocation"]["spared"]["wo"]])
    assert q["phase"]["allocation"]["asked"] == {"w2": 9, "wo": 1} and len(kept) == 5
    assert not any(".layers.0.feed_forward.w2." in k for k in q["tensors"]) and len(q["tensors"]) == 4 * 5 - 5
    work = tmp_path / ".out.spare"
    assert (work / "sp.resolved.yaml").exists() and not (work / "phase-sp-unspared").exists()
