"""Stage 2, execute: one report through papermill in its own kernel, then classified, marked and rendered
(stages 3 and 4) into <report>.ipynb and <report>.html. Everything about the kernel process lives here."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from .classify import classify, mark_notebook
from .plan import Report
from .render import render_html
from .results import STATUS_FAILED, STATUS_OK, ReportResult

PROGRESS_TTY_ENV = "FISHLAB_PROGRESS_TTY"
KERNEL_NAME = "python3"


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _kernel_manager_class(stdio, cwd: Path, env: dict[str, str], record: dict):
    """An AsyncKernelManager that launches the kernel with our cwd, env and stdout/stderr, and remembers the
    kernel process (so its exit code can tell a dead kernel apart)."""
    from jupyter_client.manager import AsyncKernelManager

    class FishlabKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("cwd", str(cwd))
            kw.setdefault("stdout", stdio)
            kw.setdefault("stderr", stdio)
            kw["env"] = {**os.environ, **(kw.get("env") or {}), **env}
            await super().start_kernel(**kw)
            record["process"] = getattr(self.provisioner, "process", None)

    return FishlabKernelManager


def execute_report(rep: Report, rr: ReportResult, run_dir: Path, kernel_cwd: Path, show_code: bool,
             timeout: float | None, start_timeout: float, tty: str | None) -> None:
    import tempfile

    import nbformat
    import papermill as pm

    final_ipynb = run_dir / f"{rep.name}.ipynb"
    partial = run_dir / f".{rep.name}.partial.ipynb"
    env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONUNBUFFERED": "1"}
    if tty:
        env[PROGRESS_TTY_ENV] = tty
    record: dict[str, Any] = {}
    capture = _LogCapture()
    loggers = [logging.getLogger("papermill"), logging.getLogger("nbclient")]
    saved = [(lg, lg.propagate, lg.level) for lg in loggers]
    error: BaseException | None = None
    t0 = time.monotonic()
    rr.side_files = []
    rr.reason = None
    rr.warnings = []
    with tempfile.TemporaryFile(mode="w+b", prefix="fishlab-kernel-") as klog:
        try:
            for lg in loggers:
                lg.addHandler(capture)
                lg.propagate = False
                lg.setLevel(logging.INFO)
            pm.execute_notebook(
                str(rep.notebook_path), str(partial), parameters=rep.parameters,
                kernel_name=KERNEL_NAME, language="python", progress_bar=False, log_output=False,
                request_save_on_cell_execute=True, start_timeout=start_timeout,
                execution_timeout=timeout,
                kernel_manager_class=_kernel_manager_class(klog, kernel_cwd, env, record),
            )
        except KeyboardInterrupt:
            partial.unlink(missing_ok=True)
            raise
        except Exception as e:          # noqa: BLE001 - every failure is reported, none stops the run
            error = e
        finally:
            for lg, prop, lvl in saved:
                lg.removeHandler(capture)
                lg.propagate = prop
                lg.setLevel(lvl)
        rr.duration_s = round(time.monotonic() - t0, 3)
        proc = record.get("process")
        exit_code = proc.poll() if proc is not None else None
        klog.seek(0)
        kernel_log = klog.read().decode("utf-8", "replace")

    rr.warnings = [r.getMessage() for r in capture.records
                   if r.levelno >= logging.WARNING and "Passed unknown parameter" not in r.getMessage()]
    try:
        nb = nbformat.read(str(partial), as_version=4) if partial.exists() else None
    except Exception:                   # noqa: BLE001
        nb = None
    if nb is None:   # papermill never wrote an output (e.g. the notebook could not be read)
        try:
            nb = nbformat.read(str(rep.notebook_path), as_version=4)
        except Exception:               # noqa: BLE001
            nb = nbformat.v4.new_notebook()

    status, reason = classify(error, nb, exit_code, kernel_log, timeout, capture.records)
    rr.status, rr.reason = status, reason
    mark_notebook(nb, rep, rr, final_ipynb)
    write_text_atomic(final_ipynb, nbformat.writes(nb))
    rr.ipynb = final_ipynb.name
    partial.unlink(missing_ok=True)
    try:
        write_text_atomic(run_dir / f"{rep.name}.html", render_html(nb, show_code=show_code, title=rep.name))
        rr.html = f"{rep.name}.html"
    except Exception as e:              # noqa: BLE001
        rr.html = None
        if rr.status == STATUS_OK:
            rr.status = STATUS_FAILED
            rr.reason = {"type": "RenderError", "message": f"{type(e).__name__}: {e}"}
        else:
            rr.warnings.append(f"HTML rendering failed: {type(e).__name__}: {e}")

