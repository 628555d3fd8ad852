"""Shared fixtures. Data from ../shared is read at test time, never copied into the repo; a test that needs it
fails (never skips) when it is missing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: these tests need the shared reference data beside the repo "
                    f"(../shared), or FISHLAB_GOLDEN pointing at a golden set")
    return path


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return _need(SHARED / "spec", "the S2 Pro spec folder")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _need(Path(os.environ.get("FISHLAB_GOLDEN", SHARED / "golden" / "A")).resolve(), "the golden set")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Tiny demo models run faster on one torch thread (thread hand-offs dominate); restored afterwards."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def measured_run(tmp_path_factory):
    """The workbook's real path on the demo, once per session (fishlab.runner.run, papermill kernels): a run
    folder in which 10_phase measured phase 1b and a GGUF import (Q4_0, exported from the demo by fishlab
    export-gguf), with samples, KL and speaker similarity; 20_layer_errors, 30_listen and 90_summary read both."""
    import shutil

    import yaml

    from fishlab.demo import build_demo_checkpoint
    from fishlab.export.gguf import export_gguf
    from fishlab.runner import run

    root = tmp_path_factory.mktemp("measured")
    src = build_demo_checkpoint(root / "demo")
    gguf_file = Path(export_gguf(src, root / "downloads" / "demo-q4_0.gguf", "q4_0")["path"])
    params = root / "params"
    params.mkdir()
    shutil.copy(REPO / "params" / "1b.yaml", params / "1b.yaml")
    (params / "gguf-q4_0.yaml").write_text(yaml.safe_dump({"phase": "gguf-q4_0", "description": "demo GGUF Q4_0",
                                                           "source": "gguf", "path": str(gguf_file)}))
    (params / "run.yaml").write_text(yaml.safe_dump({
        "checkpoint": str(src), "preset": "demo", "work_dir": str(root / "work"),
        "run": {"name": "m", "notebooks": [
            {"notebook": "10_phase", "for_each_phase": True,
             "parameters": {"max_new_tokens": 8, "layer_groups": False}},
            {"notebook": "20_layer_errors"}, {"notebook": "30_listen"}, {"notebook": "90_summary"}]}}))
    result = run(params / "run.yaml", notebooks_dir=REPO / "notebooks", renders_dir=root / "renders")
    return {"result": result, "src": src, "gguf": gguf_file, "run": root / "renders" / "m", "work": root / "work",
            "root": root}
