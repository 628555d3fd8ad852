"""fishlab upload: the dry run on real demo phase outputs (phase 1b quantized and measured by the 10_phase
report, conftest.measured_run) stages exactly the checkpoint's files + card + samples; the card parses with
huggingface_hub's own ModelCard parser; the synthetic guard holds. No test touches the network (the upload
call itself is checked against a recording stand-in for HfApi)."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from fishlab import spec
from fishlab.cli import main
from fishlab.export import hub
from fishlab.export.gguf import export_gguf


@pytest.fixture(scope="module")
def measured(measured_run):
    """Phase 1b's output and the run folder whose 10_phase report measured it (conftest.measured_run)."""
    assert measured_run["result"].ok
    return {"src": measured_run["src"], "ckpt": measured_run["work"] / "phase-1b", "run": measured_run["run"]}


def test_dry_run_stages_the_checkpoint_card_and_samples(measured, tmp_path):
    ckpt = measured["ckpt"]
    s = hub.stage(ckpt, "me/s2-pro-int4-g128", tmp_path / "staged", measured["run"])
    own = {str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file()}
    assert set(s["files"]) == own | {"README.md", "fishlab_results.json", "samples/1b_tts.wav",
                                     "samples/1b_clone.wav", "samples/base_tts.wav", "samples/base_clone.wav",
                                     "samples/reference.wav"}
    for name in own:
        assert s["files"][name] == (ckpt / name).stat().st_size
    card = ModelCard.load(tmp_path / "staged" / "README.md")        # huggingface_hub's own parser
    d = card.data.to_dict()
    assert d["base_model"] == "fishaudio/s2-pro" and d["license"] == "other"
    assert d["license_name"] == "fish-audio-research-license" and d["license_link"] == spec.HUB_LICENSE_LINK
    assert d["pipeline_tag"] == "text-to-speech" and d["base_model_relation"] == "quantized"
    assert {"text-to-speech", "quantized", "int4", "synthetic"} <= set(d["tags"])
    text = card.text
    assert "SYNTHETIC" in text and "INT4 symmetric weights in [-7, 7], one scale per 128 input features" in text
    side = json.loads((measured["run"] / "10_phase-1b.metrics.json").read_text())
    assert f"{side['listening']['slow_top1'] * 100:.1f}%" in text            # the report's own numbers
    assert f"{side['listening']['slow_kl_mean']:.4g}" in text and "speaker similarity, clone vs reference" in text
    assert "word error rate" in text and f"fishlab {hub.__version__}" in text
    assert "x smaller than bf16" in text and "Fish Audio Research License" in text
    assert json.loads((tmp_path / "staged" / "fishlab_results.json").read_text())["phase"]["name"] == "1b"


def test_cli_dry_run_prints_files_and_card_and_uploads_nothing(measured, tmp_path, capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the dry run touched the hub")
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", no_network)
    args = ["upload", "--checkpoint", str(measured["ckpt"]), "--repo", "me/x", "--results", str(measured["run"]),
            "--staging", str(tmp_path / "st")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "staged" in out and "model.safetensors" in out and "base_model: fishaudio/s2-pro" in out
    assert "dry run: nothing uploaded" in out and "needs --allow-synthetic" in out
    assert main(args + ["--yes"]) == 2                                  # the synthetic guard, before any call
    assert "--allow-synthetic" in capsys.readouterr().err


def test_upload_calls_huggingface_hub_with_the_staged_folder(measured, tmp_path, monkeypatch):
    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("CommitInfo", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", Recorder)
    s = hub.stage(measured["ckpt"], "me/x", tmp_path / "st", measured["run"])
    assert hub.upload(s, private=True, allow_synthetic=True) == "https://hub/commit/1"
    assert calls[0] == ("create_repo", "me/x", {"private": True, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "me/x" and calls[1][1]["folder_path"] == str(tmp_path / "st")


def test_gguf_and_refusals(measured, tmp_path):
    g = export_gguf(measured["src"], tmp_path / "g" / "demo-q8_0.gguf", "q8_0")
    s = hub.stage(g["path"], "me/s2-pro-gguf", tmp_path / "sg")
    assert set(s["files"]) == {"demo-q8_0.gguf", "README.md"} and not s["measured"]
    card = ModelCard.load(tmp_path / "sg" / "README.md")
    assert "gguf" in card.data.tags and "q8_0" in card.data.tags and "s2.cpp" in card.text
    assert "Not measured for this upload" in card.text
    with pytest.raises(hub.HubError, match="not quantized"):
        hub.stage(measured["src"], "me/x", tmp_path / "s3")
    with pytest.raises(hub.HubError, match="ORG/NAME"):
        hub.stage(measured["ckpt"], "no-org", tmp_path / "s4")
