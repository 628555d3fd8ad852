import json

from safetensors import safe_open

from fishlab.config import load_codec_config, load_transformer_config, preset
from fishlab.manifest import codec_manifest, linear_targets, totals, transformer_manifest


def test_s2pro_manifest_equals_the_spec(spec_dir):
    ref = json.loads((spec_dir / "s2pro-manifest.json").read_text())
    cfg = preset("s2-pro")
    tm, cm = transformer_manifest(cfg.transformer), codec_manifest(cfg.codec)
    assert [(s.name, list(s.shape), s.dtype) for s in tm] == [(k, v[0], v[1]) for k, v in ref["transformer"].items()]
    assert [(s.name, list(s.shape), s.dtype) for s in cm] == [(k, v[0], v[1]) for k, v in ref["codec"].items()]
    assert {s.name: s.internal for s in tm} == ref["transformer_internal_names"]
    tot = ref["totals"]
    assert (len(tm), sum(s.numel for s in tm)) == (358, 4_561_852_416) == (tot["transformer"]["tensors"],
                                                                          tot["transformer"]["params"])
    assert (len(cm), sum(s.numel for s in cm)) == (535, 391_430_530) == (tot["codec"]["tensors"], tot["codec"]["params"])
    assert {k: {"params": v["params"], "tensors": v["tensors"]} for k, v in totals(tm, "group").items()} == \
        tot["transformer"]["groups"]
    assert {k: {"params": v["params"], "tensors": v["tensors"]} for k, v in totals(cm, "group").items()} == \
        tot["codec"]["groups"]
    assert sum(s.numel for s in linear_targets(cfg.transformer, "all")) == tot["transformer"]["linear_weights_201_modules_params"]


def test_components_and_targets():
    t = preset("s2-pro").transformer
    tm = transformer_manifest(t)
    comp = totals(tm, "component")
    assert comp["slow_ar"]["tensors"] == 180 and comp["fast_ar"]["tensors"] == 21
    assert comp["embeddings"]["tensors"] == 3 and comp["norms"]["tensors"] == 36 * 4 + 1 + 4 * 2 + 1
    slow, all_ = linear_targets(t, "slow"), linear_targets(t, "all")
    assert len(slow) == 180 and len(all_) == 201
    assert {s.projection for s in slow} == {"wqkv", "wo", "w1", "w2", "w3"}
    assert all_[-1].internal == "fast_output.weight"
    assert all(s.kind == "linear" and len(s.shape) == 2 for s in all_)


def test_golden_files_match_their_configs(golden_dir):
    for sub, make in (("transformer", lambda d: transformer_manifest(load_transformer_config(d))),
                      ("codec", lambda d: codec_manifest(load_codec_config(d)))):
        d = golden_dir / sub
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert on_disk == {s.name: s.shape for s in make(d)}, sub
