"""Stage 3, classify and mark: why a report stopped (an exception, a cell timeout, a dead kernel, a job's time
limit; or, for a job that ended without a result, the scheduler's end state), and the executed notebook marked
so that it says so (culprit cell, pending cells after it, a styled marker cell)."""
from __future__ import annotations

import html as _html
import logging
import re
from pathlib import Path
from typing import Any

from .results import (STATUS_CANCELLED, STATUS_DEAD, STATUS_FAILED, STATUS_OK, STATUS_PREEMPTED, STATUS_TIMEOUT,
                      ReportResult, first_line)

MARKER_TAG = "fishlab-status-cell"
PAPERMILL_MARKER_TAG = "papermill-error-cell-tag"
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def running_cell_index(nb) -> int | None:
    """The cell that was executing when papermill stopped: the last one it started."""
    idx = None
    for i, c in enumerate(nb.cells):
        if c.get("metadata", {}).get("papermill", {}).get("start_time"):
            idx = i
    return idx


def tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in _ANSI_RE.sub("", text or "").rstrip().splitlines()
             if ln.strip() and "running over TCP without encryption" not in ln]
    return "\n".join(lines[-n:])


def classify(error, nb, exit_code, kernel_log, timeout, records) -> tuple[str, dict | None]:
    if error is None:
        return STATUS_OK, None
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    cell = running_cell_index(nb)
    reason: dict[str, Any] = {"type": type(error).__name__, "message": str(error).strip(),
                              "cell_index": cell, "execution_count": None, "tail": ""}
    if _job_time_limit(error):
        reason.update(message="the job reached its time limit (resources.timeout_min); the scheduler's warning "
                              "signal stopped it", tail=tail(str(error)))
        return STATUS_TIMEOUT, reason
    if isinstance(error, PapermillExecutionError):
        reason.update(type=error.ename, message=str(error.evalue), execution_count=error.exec_count,
                      tail=tail("\n".join(error.traceback)))
        for i, c in enumerate(nb.cells):   # the failed cell (papermill inserted marker cells before it)
            if c.get("metadata", {}).get("papermill", {}).get("exception"):
                reason["cell_index"] = i
        return STATUS_FAILED, reason
    if isinstance(error, CellTimeoutError) or (isinstance(error, TimeoutError) and cell is not None):
        reason["message"] = (f"a cell ran longer than the {timeout:g} s cell timeout" if timeout
                             else first_line(error))
        reason["tail"] = tail(str(error))
        return STATUS_TIMEOUT, reason
    died = isinstance(error, DeadKernelError) or "kernel died" in str(error).lower() or (
        exit_code is not None and exit_code != 0 and not isinstance(error, (OSError, ValueError)))
    if died:
        how = _describe_exit(exit_code)
        when = "while running a cell" if cell is not None else "before running any cell"
        reason["message"] = f"the kernel died {when} ({how})"
        log_lines = "\n".join(r.getMessage() for r in records if r.levelno >= logging.ERROR)
        reason["tail"] = tail(kernel_log) or tail(log_lines)
        return STATUS_DEAD, reason
    reason["tail"] = tail(str(error))
    return STATUS_FAILED, reason


def _job_time_limit(error) -> bool:
    """submitit turns the scheduler's warning signal before a job's time limit into UncompletedJobError, raised
    wherever the job is (here: inside papermill)."""
    try:
        from submitit.core.utils import UncompletedJobError
    except ImportError:                 # submitit is a dependency; a broken install is not a time limit
        return False
    return isinstance(error, UncompletedJobError)


def classify_job_end(state: str, log_tail: str, timeout_min: float | None) -> tuple[str, dict]:
    """A job that ended without a result: its status and reason from the scheduler's end state (SLURM's sacct
    State, e.g. "TIMEOUT", "CANCELLED by 1234", "OUT_OF_MEMORY"; a local job's "FINISHED")."""
    st = (state or "UNKNOWN").upper()
    limit = f" of {timeout_min:g} min" if timeout_min else ""
    if st.startswith("TIMEOUT") or st.startswith("DEADLINE"):
        status, msg = STATUS_TIMEOUT, f"the job ran past its time limit{limit} and was ended by the scheduler"
    elif st.startswith("CANCELLED"):
        status, msg = STATUS_CANCELLED, f"the job was cancelled ({state})"
    elif st.startswith("PREEMPTED"):
        status, msg = STATUS_PREEMPTED, "the job was preempted and not requeued"
    elif st.startswith("OUT_OF_MEMORY"):
        status, msg = STATUS_DEAD, "the job ran out of memory (resources.mem_gb) and was killed"
    elif st.startswith("NODE_FAIL") or st.startswith("BOOT_FAIL"):
        status, msg = STATUS_FAILED, f"the job's node failed ({state})"
    else:
        status, msg = STATUS_FAILED, f"the job ended without a result (state {state}); see its stderr"
    return status, {"type": f"job {st.split()[0]}", "message": msg, "cell_index": None, "execution_count": None,
                    "tail": tail(log_tail)}


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        import signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", often the out-of-memory killer" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _marker_html(kind: str, text: str, detail: str = "", anchor: str | None = None) -> str:
    colors = {STATUS_OK: ("#1a7f37", "#e9f7ec"), STATUS_FAILED: ("#b42318", "#fdecea"),
              STATUS_TIMEOUT: ("#9a6700", "#fff4d6"), STATUS_DEAD: ("#6e1fb4", "#f3e8fd"),
              STATUS_CANCELLED: ("#57606a", "#eaeef2"), STATUS_PREEMPTED: ("#57606a", "#eaeef2")}
    fg, bg = colors.get(kind, ("#b42318", "#fdecea"))
    idattr = f' id="{anchor}"' if anchor else ""
    pre = (f'<pre style="margin:0.5em 0 0;white-space:pre-wrap;font-size:0.85em;color:#333">'
           f'{_html.escape(detail)}</pre>') if detail else ""
    return (f'<div{idattr} style="border:2px solid {fg};background:{bg};color:{fg};padding:0.6em 1em;'
            f'border-radius:6px;font-family:Helvetica,Arial,sans-serif;font-size:1.1em">'
            f'<strong>fishlab: {_html.escape(kind.upper())}</strong> &mdash; {text}{pre}</div>')


# Statuses papermill does not mark itself: (what the culprit cell did, the headline).
_UNMARKED = {STATUS_TIMEOUT: ("timed out", "A cell timed out"),
             STATUS_DEAD: ("killed its kernel", "The kernel died"),
             STATUS_CANCELLED: ("was running when the job was cancelled", "The job was cancelled"),
             STATUS_PREEMPTED: ("was running when the job was preempted", "The job was preempted")}


def mark_notebook(nb, rr: ReportResult, final_path: Path) -> None:
    import nbformat

    nb.cells = [c for c in nb.cells if MARKER_TAG not in c.get("metadata", {}).get("tags", [])]
    pm_meta = nb.metadata.setdefault("papermill", {})
    pm_meta["output_path"] = str(final_path)
    for key in ("widgets",):            # no stale widget state in reports
        nb.metadata.pop(key, None)
    reason = rr.reason or {}
    nb.metadata["fishlab"] = {"status": rr.status, "report": rr.name, "notebook": rr.notebook,
                              "duration_s": rr.duration_s, "reason": reason or None,
                              "job": (rr.job or {}).get("id")}
    if rr.status not in _UNMARKED:
        if rr.status == STATUS_FAILED and not any(
                PAPERMILL_MARKER_TAG in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            top = nbformat.v4.new_markdown_cell(_marker_html(
                STATUS_FAILED, _html.escape(f"{reason.get('type')}: {first_line(reason.get('message'))}"),
                reason.get("tail", "")))
            top.metadata["tags"] = [MARKER_TAG]
            nb.cells.insert(0, top)
        return

    # Papermill left this unmarked: mark the culprit and everything after it, then add the marker cells.
    pm_meta["exception"] = True
    idx = reason.get("cell_index")
    if idx is not None and 0 <= idx < len(nb.cells):
        cell = nb.cells[idx]
        meta = cell.metadata.setdefault("papermill", {})
        meta["status"] = "failed"
        meta["exception"] = True
        for later in nb.cells[idx + 1:]:
            lm = later.metadata.setdefault("papermill", {})
            if not lm.get("start_time"):
                lm["status"] = "pending"
        what = _UNMARKED[rr.status][0]
        src = cell.get("source", "")
        preview = "\n".join(src.splitlines()[:15]) + ("\n..." if len(src.splitlines()) > 15 else "")
        anchor = nbformat.v4.new_markdown_cell(_marker_html(
            rr.status, f"execution stopped here: the next cell {what}. Its code:", preview,
            anchor="fishlab-error-cell"))
        anchor.metadata["tags"] = [MARKER_TAG]
        nb.cells.insert(idx, anchor)
        where = f'at <a href="#fishlab-error-cell">cell {idx + 2} of this notebook</a>'
    else:
        where = "before any cell ran"
    label = _UNMARKED[rr.status][1]
    top = nbformat.v4.new_markdown_cell(_marker_html(
        rr.status, f"{label} {where}: {_html.escape(reason.get('message', ''))}. "
                   f"Cells after it did not run.", reason.get("tail", "")))
    top.metadata["tags"] = [MARKER_TAG]
    nb.cells.insert(0, top)
    if idx is not None:     # index of the culprit in the saved notebook (after the two inserted cells)
        reason["cell_index"] = idx + 2

