"""Committed notebooks: a `parameters` cell, no outputs, and every parameter the runner injects."""
import ast

import nbformat
import pytest

from fishlab.runner import check_notebook_clean

NOTEBOOKS = ["00_architecture", "10_phase", "15_trained_model", "20_layer_errors", "30_listen", "90_summary"]
INJECTED = {"output_dir", "report_name", "params_dir", "show_progress"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_parameterised(repo, name):
    path = repo / "notebooks" / f"{name}.ipynb"
    assert check_notebook_clean(path) == []
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    names = {t.id for node in ast.parse(params[0].source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert INJECTED <= names, f"{name}: the parameters cell must declare {INJECTED - names}"
    assert nb.cells[0].cell_type == "markdown" and "**Question:**" in nb.cells[0].source


def test_every_notebook_in_the_folder_is_covered(repo):
    assert sorted(p.stem for p in (repo / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)


def test_phase_report_named_after_its_phase_under_plain_papermill(repo, tmp_path, monkeypatch):
    """`papermill 10_phase.ipynb out.ipynb -f params/2c.yaml` without report_name: the side file follows the
    phase (10_phase-2c.metrics.json), as the runner would name it."""
    import json
    import subprocess
    import sys

    monkeypatch.setenv("FISHLAB_CACHE", str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "papermill", str(repo / "notebooks" / "10_phase.ipynb"),
                           str(tmp_path / "out.ipynb"), "-f", str(repo / "params" / "2c.yaml"),
                           "-p", "output_dir", str(tmp_path), "-p", "tts", "False", "--no-progress-bar"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.metrics.json")) == ["10_phase-2c.metrics.json"]
    assert json.loads((tmp_path / "10_phase-2c.metrics.json").read_text())["phase"]["name"] == "2c"
