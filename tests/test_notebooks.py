"""Committed notebooks: a `parameters` cell, no outputs, and every parameter the runner injects."""
import ast

import nbformat
import pytest

from fishlab.runner import check_notebook_clean

NOTEBOOKS = ["00_architecture", "10_phase", "20_layer_errors", "30_listen", "90_summary"]
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
