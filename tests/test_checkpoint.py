import json
import shutil
import struct

import pytest
import torch

from fishlab.checkpoint import (CheckpointError, OutTensor, inspect_checkpoint, load_transformer_state_dict,
                                read_safetensors_header, validate_transformer, write_sharded)


@pytest.fixture
def sharded(golden_dir, tmp_path):
    """Golden A's transformer re-written in the real two-shard layout."""
    sd = load_transformer_state_dict(golden_dir / "transformer")
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(golden_dir / "transformer" / "config.json", d)
    write_sharded(d, [OutTensor(n, tuple(t.shape), "float32", (lambda t=t: t)) for n, t in sd.items()], 2)
    return d, sd


def test_sharded_and_single_file_load_the_same(sharded, golden_dir):
    d, sd = sharded
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model-00001-of-00002.safetensors",
                                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd) and len(set(index["weight_map"].values())) == 2
    again = load_transformer_state_dict(d)
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    info = inspect_checkpoint(d)
    assert info["tensors"] == 31 and info["tensor_data_bytes"] == info["manifest_bytes"]


def test_missing_shard_is_named(sharded):
    d, _ = sharded
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing on disk: model-00002-of-00002.safetensors"):
        validate_transformer(d)


def test_truncated_header_and_data_name_the_file(sharded):
    d, _ = sharded
    shard = d / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated or corrupt header"):
        validate_transformer(d)
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated file"):
        validate_transformer(d)
    n = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(CheckpointError, match=f"{shard}.*corrupt safetensors header"):
        validate_transformer(d)
    shard.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated file"):
        read_safetensors_header(shard)


def _rewrite(d, sd):
    for p in d.glob("model*"):
        p.unlink()
    write_sharded(d, [OutTensor(n, tuple(t.shape), "float32", (lambda t=t: t)) for n, t in sd.items()], 2)


def test_wrong_shape_missing_and_unexpected_tensors_are_listed(sharded):
    d, sd = sharded
    bad = dict(sd)
    name = "text_model.model.layers.1.attention.wo.weight"
    bad[name] = torch.zeros(64, 64)
    _rewrite(d, bad)
    with pytest.raises(CheckpointError, match=rf"wrong shape/dtype {name}: expected \[64, 128\], found \[64, 64\]"):
        validate_transformer(d)
    bad = {k: v for k, v in sd.items() if ".layers.0." not in k}
    bad["text_model.model.layers.9.extra.weight"] = torch.zeros(2)
    _rewrite(d, bad)
    with pytest.raises(CheckpointError) as e:
        validate_transformer(d)
    msg = str(e.value)
    assert "missing" in msg and "(16 in all)" in msg and "unexpected text_model.model.layers.9.extra.weight (1)" in msg
    assert str(d) in msg


def test_no_weights_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        validate_transformer(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        validate_transformer(tmp_path / "nope")


def test_streaming_writer_refuses_a_tensor_that_breaks_its_announcement(tmp_path):
    t = OutTensor("w", (2, 2), "float32", lambda: torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match="announced as \\[2, 2\\] float32 but produced \\[2, 3\\]"):
        write_sharded(tmp_path, [t], 1)
    assert list(tmp_path.iterdir()) == []     # nothing half-written under the final name
