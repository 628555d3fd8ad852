"""What notebooks and committed notebook files need from the runner: progress bars that stay out of reports,
and notebooks kept clean (no outputs, no execution metadata) in git."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from .classify import MARKER_TAG, PAPERMILL_MARKER_TAG
from .execute import PROGRESS_TTY_ENV


def tqdm_kwargs(show_progress: bool) -> dict[str, Any]:
    """Keyword arguments for tqdm inside a notebook: `tqdm(xs, **tqdm_kwargs(show_progress))`.
    Off when show_progress is false; under `fishlab run` from a terminal, the bar goes to that terminal (not
    into the report); in an interactive Jupyter session (no runner), tqdm's defaults."""
    if not show_progress:
        return {"disable": True}
    tty = os.environ.get(PROGRESS_TTY_ENV)
    if tty:
        try:
            return {"file": open(tty, "w", buffering=1), "dynamic_ncols": True}
        except OSError:
            return {"disable": True}
    return {}


_EXEC_TAGS = ("injected-parameters", PAPERMILL_MARKER_TAG, MARKER_TAG)
_EXEC_NB_META = ("papermill", "widgets", "fishlab")
_EXEC_CELL_META = ("papermill", "execution")


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []) or [])


def strip_outputs(path: str | Path) -> bool:
    """Clear outputs, execution counts and execution metadata (papermill/fishlab/widgets; injected-parameter
    and marker cells) from a notebook in place. Returns True when the file changed."""
    import nbformat

    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    nb.cells = [c for c in nb.cells if not set(_tags(c)) & set(_EXEC_TAGS)]
    for k in _EXEC_NB_META:
        nb.metadata.pop(k, None)
    for c in nb.cells:
        for k in _EXEC_CELL_META:
            c.metadata.pop(k, None)
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
    after = nbformat.writes(nb)
    if not after.endswith("\n"):
        after += "\n"
    if after == before:
        return False
    write_text_atomic(path, after)
    return True


def check_notebook_clean(path: str | Path) -> list[str]:
    """Problems that keep a committed notebook from being clean (empty list: clean): outputs, execution
    counts, execution metadata, injected/marker cells, and a missing or duplicated `parameters` cell."""
    import nbformat

    path = Path(path)
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as e:              # noqa: BLE001
        return [f"{path.name}: cannot read notebook: {type(e).__name__}: {e}"]
    problems: list[str] = []
    n_params = 0
    for i, c in enumerate(nb.cells):
        tags = _tags(c)
        if "parameters" in tags:
            n_params += 1
            if c.cell_type != "code":
                problems.append(f"{path.name}: cell {i}: the 'parameters' cell must be a code cell")
        bad = [t for t in tags if t in _EXEC_TAGS]
        if bad:
            problems.append(f"{path.name}: cell {i}: left over from an execution (tag {bad[0]!r})")
        if c.cell_type == "code":
            if c.get("outputs"):
                problems.append(f"{path.name}: cell {i}: has outputs")
            if c.get("execution_count") is not None:
                problems.append(f"{path.name}: cell {i}: has execution_count {c.execution_count}")
        meta = [k for k in ("papermill", "execution") if k in c.get("metadata", {})]
        if meta:
            problems.append(f"{path.name}: cell {i}: has execution metadata ({', '.join(meta)})")
    meta = [k for k in _EXEC_NB_META if k in nb.metadata]
    if meta:
        problems.append(f"{path.name}: notebook metadata from an execution ({', '.join(meta)})")
    if n_params == 0:
        problems.append(f"{path.name}: no cell tagged 'parameters'")
    elif n_params > 1:
        problems.append(f"{path.name}: {n_params} cells tagged 'parameters' (papermill uses one)")
    return problems
