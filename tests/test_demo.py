import json

import pytest
import torch

from fishlab.checkpoint import inspect_checkpoint, iter_tensors, read_headers
from fishlab.config import load_config, preset
from fishlab.demo import build_demo_checkpoint, checkpoint_digest, is_synthetic
from fishlab.manifest import transformer_manifest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("d") / "demo")


def test_demo_has_the_real_layout(demo):
    names = sorted(p.name for p in demo.iterdir())
    assert names == ["codec.pth", "codec_config.json", "config.json", "fishlab_demo.json",
                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.json"]
    cfg = load_config(demo)
    assert cfg.transformer == preset("demo").transformer and cfg.codec == preset("demo").codec
    info = inspect_checkpoint(demo)           # the same strict header validation as a real checkpoint
    assert info["dtypes"] == {"bfloat16": len(transformer_manifest(cfg.transformer))}
    assert json.loads((demo / "config.json").read_text())["model_type"] == "fish_qwen3_omni"
    assert is_synthetic(demo)
    sd = torch.load(demo / "codec.pth", weights_only=True)
    assert isinstance(sd, dict) and all(v.dtype == torch.float32 for v in sd.values())


def test_demo_is_deterministic_and_refuses_to_overwrite(demo, tmp_path):
    other = build_demo_checkpoint(tmp_path / "again")
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json", "config.json"):
        assert (demo / f).read_bytes() == (other / f).read_bytes(), f
    a, b = torch.load(demo / "codec.pth", weights_only=True), torch.load(other / "codec.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = checkpoint_digest(other)
    with pytest.raises(FileExistsError, match="already exists"):
        build_demo_checkpoint(other)
    assert checkpoint_digest(other) == before


def test_demo_weights_are_heavy_tailed_with_outlier_channels(demo):
    infos, _ = read_headers(demo)
    name = "text_model.model.layers.0.feed_forward.w1.weight"
    (_, w), = iter_tensors(infos, [name])
    w = w.float()
    z = (w - w.mean()) / w.std()
    assert (z ** 4).mean() > 4.0                            # Gaussian kurtosis is 3
    col = w.abs().amax(0)
    assert col.max() > 4 * col.median()                     # a few outlier input channels
    row = w.std(1)
    assert row.max() > 1.5 * row.min()                      # per-row scale variation


def test_demo_tokenizer_has_the_real_special_token_layout(demo):
    from tokenizers import Tokenizer
    t = preset("demo").transformer
    tok = Tokenizer.from_file(str(demo / "tokenizer.json"))
    base = t.eos_token_id - 2
    for offset, s in ((0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>"), (26, "<|pad|>"), (30, "<|voice|>"),
                      (34, "<|audio_pad|>"), (35, "<|semantic:0|>")):
        assert tok.token_to_id(s) == base + offset, s      # same offsets as 151643 + k in S2 Pro
    enc = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == t.eos_token_id - 1 and enc.ids[-1] == t.eos_token_id
    assert tok.token_to_id(f"<|semantic:{t.n_semantic - 1}|>") == t.semantic_end_id
