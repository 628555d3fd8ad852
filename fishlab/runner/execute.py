"""Stage 2, execute: one report through papermill in its own kernel, then classified, marked and rendered
(stages 3 and 4) into <report>.ipynb and <report>.html. Everything about the kernel process lives here.

`execute_report` runs in the runner's process (local executor) or in a job (`run_report_job`, what a SLURM or
local submitit job calls); `finish_unfinished` saves the notebook of a job that ended without a result (time
limit, cancelled, out of memory), from what papermill had saved of it, marked with the scheduler's reason."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from .classify import classify, mark_notebook, running_cell_index
from .plan import Report
from .render import render_html
from .results import STATUS_FAILED, STATUS_OK, STATUS_RUNNING, ReportResult, now

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


def partial_path(run_dir: Path, name: str) -> Path:
    """Where papermill saves a report's notebook after every cell while it runs."""
    return run_dir / f".{name}.partial.ipynb"


def execute_report(rep: Report, rr: ReportResult, run_dir: Path, kernel_cwd: Path, show_code: bool,
                   timeout: float | None, start_timeout: float, tty: str | None) -> None:
    import tempfile

    import nbformat
    import papermill as pm

    partial = partial_path(run_dir, rep.name)
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
        if proc is not None and exit_code is None and error is not None:
            _stop(proc)      # e.g. a job's time-limit signal left nbclient no time to shut its kernel down
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
    save_report(nb, rr, run_dir, show_code)


def save_report(nb, rr: ReportResult, run_dir: Path, show_code: bool) -> None:
    """Mark the executed notebook with rr's status, write <report>.ipynb and <report>.html, drop the partial."""
    import nbformat

    final_ipynb = run_dir / f"{rr.name}.ipynb"
    mark_notebook(nb, rr, final_ipynb)
    write_text_atomic(final_ipynb, nbformat.writes(nb))
    rr.ipynb = final_ipynb.name
    partial_path(run_dir, rr.name).unlink(missing_ok=True)
    try:
        write_text_atomic(run_dir / f"{rr.name}.html", render_html(nb, show_code=show_code, title=rr.name))
        rr.html = f"{rr.name}.html"
    except Exception as e:              # noqa: BLE001
        rr.html = None
        if rr.status == STATUS_OK:
            rr.status = STATUS_FAILED
            rr.reason = {"type": "RenderError", "message": f"{type(e).__name__}: {e}"}
        else:
            rr.warnings.append(f"HTML rendering failed: {type(e).__name__}: {e}")


def finish_unfinished(rr: ReportResult, run_dir: Path, show_code: bool) -> None:
    """Save the report of a job that ended without a result: rr.status / rr.reason say why (the scheduler's
    word); the notebook is what papermill had saved (the cell that was running is the culprit), or an empty
    one when the job never got that far."""
    import nbformat

    partial = partial_path(run_dir, rr.name)
    final = run_dir / f"{rr.name}.ipynb"
    job_id = (rr.job or {}).get("id")
    if not partial.exists() and job_id and final.exists():
        try:        # another watcher (`fishlab status` next to the runner) saved this job's report already
            if nbformat.read(str(final), as_version=4).metadata.get("fishlab", {}).get("job") == job_id:
                rr.ipynb, rr.html = final.name, f"{rr.name}.html"
                return
        except Exception:               # noqa: BLE001 - unreadable: save it again
            pass
    try:
        nb = nbformat.read(str(partial), as_version=4)
    except Exception:                   # noqa: BLE001 - missing or half-written: nothing ran that we can show
        nb = nbformat.v4.new_notebook()
    if rr.reason is not None and rr.reason.get("cell_index") is None:
        rr.reason["cell_index"] = running_cell_index(nb)
    save_report(nb, rr, run_dir, show_code)


def _stop(proc) -> None:
    try:
        proc.terminate()
        proc.wait(timeout=5)
    except Exception:                   # noqa: BLE001 - already gone, or not ours to wait for
        try:
            proc.kill()
        except Exception:               # noqa: BLE001
            pass


def run_report_job(rep: Report, run_dir: str, kernel_cwd: str, show_code: bool, timeout: float | None,
                   start_timeout: float) -> dict:
    """What a job runs (on a cluster node, or a local subprocess): one report, start to saved HTML. Returns the
    ReportResult as a dict (submitit pickles it next to the job's logs; the runner collects it)."""
    rr = ReportResult(rep.name, rep.notebook, status=STATUS_RUNNING, parameters=rep.parameters, started=now())
    execute_report(rep, rr, Path(run_dir), Path(kernel_cwd), show_code, timeout, start_timeout, tty=None)
    rr.finished = now()
    return rr.to_dict()

