"""The driver: plan the run, execute the selected reports one after another, keep the index current."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from .execute import execute_report
from .index import assign_side_files, write_status
from .plan import RunnerError, plan_run
from .results import (STATUS_FAILED, STATUS_INTERRUPTED, STATUS_NOT_RUN, STATUS_OK, STATUS_QUEUED, STATUS_RUNNING,
                      ReportResult, RunResult, first_line, now, read_previous, result_from_dict)


def _stderr_echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(params_file: str | Path, run_name: str | None = None, notebooks_dir: str | Path = "notebooks",
        renders_dir: str | Path = "renders", show_code: bool = False, only: Iterable[str] | None = None,
        overrides: dict[str, Any] | None = None, timeout: float | None = None, *,
        cwd: str | Path | None = None, echo: Callable[[str], None] | None = _stderr_echo,
        show_progress: bool | None = None, start_timeout: float = 60) -> RunResult:
    """Execute every report of a run file (see the module docstring) and return the result; `.ok` is False
    when any executed report failed. User errors raise RunnerError before anything is executed.
    A KeyboardInterrupt marks the current report "interrupted", the rest "not run", and is re-raised."""
    if show_progress is None:
        try:
            show_progress = sys.stderr.isatty()
        except (AttributeError, ValueError):
            show_progress = False
    if timeout is not None and not timeout > 0:
        raise RunnerError(f"timeout must be a positive number of seconds, got {timeout}")
    plan = plan_run(params_file, run_name, notebooks_dir, renders_dir, only, overrides, show_progress)
    echo = echo or (lambda _line: None)
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    kernel_cwd = Path(cwd).resolve() if cwd is not None else Path(notebooks_dir).resolve().parent
    tty = None
    if show_progress:
        try:
            tty = os.ttyname(sys.stderr.fileno())
        except (OSError, AttributeError, ValueError):
            tty = None

    previous = read_previous(run_dir)
    result = RunResult(plan.run_name, run_dir, plan.params_file, [], list(plan.selected), started=now(),
                       show_code=show_code)
    for rep in plan.reports:
        rr = ReportResult(rep.name, rep.notebook, parameters=rep.parameters)
        if rep.name not in plan.selected:
            old = previous.get(rep.name)
            if old:
                rr = result_from_dict(old)
                rr.previous = True
            else:
                rr.status = STATUS_NOT_RUN
        result.reports.append(rr)
    write_status(result)

    todo = [r for r in plan.reports if r.name in plan.selected]
    n = len(todo)
    try:
        for i, rep in enumerate(todo, 1):
            rr = result.report(rep.name)
            rr.status = STATUS_RUNNING
            rr.started = now()
            write_status(result)
            echo(f"[{i}/{n}] {rep.name} ...")
            execute_report(rep, rr, run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)
            rr.finished = now()
            assign_side_files(result)
            write_status(result)
            msg = f"[{i}/{n}] {rep.name} {rr.status} ({rr.duration_s:.1f} s)"
            if rr.reason:
                msg += f": {rr.reason.get('type')}: {first_line(rr.reason.get('message'))}"
            echo(msg)
    except KeyboardInterrupt:
        for rr in result.reports:
            if rr.status == STATUS_RUNNING:
                rr.status = STATUS_INTERRUPTED
                rr.reason = {"type": "KeyboardInterrupt", "message": "the run was interrupted"}
            elif rr.status == STATUS_QUEUED:
                rr.status = STATUS_NOT_RUN
        result.status = STATUS_INTERRUPTED
        result.finished = now()
        assign_side_files(result)
        write_status(result)
        echo(f"interrupted; see {result.index_html}")
        raise
    result.status = STATUS_OK if all(
        r.status == STATUS_OK for r in result.reports if r.name in result.executed) else STATUS_FAILED
    result.finished = now()
    assign_side_files(result)
    write_status(result)
    bad = [r for r in result.reports if r.name in result.executed and r.status != STATUS_OK]
    echo(f"{plan.run_name}: {n - len(bad)}/{n} ok" + (f", failed: {', '.join(r.name for r in bad)}" if bad else "")
         + f" -> {result.index_html}")
    return result

