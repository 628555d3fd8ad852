"""The driver: plan the run, hand its reports to an executor in the order their needs allow, and keep the index
current as they end. `status` is the watching half alone, for a run whose jobs outlive the process that
submitted them (`fishlab status RUN` from any shell)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .executors import DONE, RUNNING, Handle, check_submit_here, make_executor
from .index import assign_side_files, write_status
from .plan import Report, RunnerError, plan_run
from .results import (LIVE_STATUSES, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_NOT_RUN, STATUS_OK, STATUS_QUEUED,
                      STATUS_RUNNING, ReportResult, RunResult, first_line, now, read_previous, read_run_json,
                      result_from_dict)

# Seconds between two looks at live jobs (one sacct call per look on SLURM).
POLL_S = {"local": 0.0, "submitit-local": 0.5, "slurm": 15.0}


def _stderr_echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(params_file: str | Path, run_name: str | None = None, notebooks_dir: str | Path = "notebooks",
        renders_dir: str | Path = "renders", show_code: bool = False, only: Iterable[str] | None = None,
        overrides: dict[str, Any] | None = None, timeout: float | None = None, *,
        cwd: str | Path | None = None, echo: Callable[[str], None] | None = _stderr_echo,
        show_progress: bool | None = None, start_timeout: float = 60, executor: str | None = None,
        resume: bool | None = None, poll_s: float | None = None) -> RunResult:
    """Execute the reports of a run file (see the package docstring) and return the result; `.ok` is False
    when any executed report failed. User errors raise RunnerError before anything is executed.

    executor: "local" (in this process, one report after another), "slurm" or "submitit-local" (one job per
    report); None: the run file's `run.executor`, else local. resume: keep the previous run's ok reports whose
    parameters are unchanged instead of running them again (None: on for job executors, off locally); reports
    named by `only` always run. Jobs of an earlier invocation still queued or running are watched, not
    resubmitted. A KeyboardInterrupt marks the report running here "interrupted" and what was not started
    "not run" (submitted jobs keep running: watch them with `status`), and is re-raised."""
    if show_progress is None:
        try:
            show_progress = sys.stderr.isatty()
        except (AttributeError, ValueError):
            show_progress = False
    if timeout is not None and not timeout > 0:
        raise RunnerError(f"timeout must be a positive number of seconds, got {timeout}")
    plan = plan_run(params_file, run_name, notebooks_dir, renders_dir, only, overrides, show_progress)
    kind = executor or plan.executor or "local"
    check_submit_here(kind)
    if kind != "local":                 # a job has no terminal to draw progress bars on
        show_progress = False
        for rep in plan.reports:
            rep.parameters["show_progress"] = False
    resume = (kind != "local") if resume is None else resume
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
    ex = make_executor(kind, run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)

    result = RunResult(plan.run_name, run_dir, plan.params_file, [], [], started=now(), show_code=show_code,
                       executor=kind)
    todo, active = _sort_out(plan, read_previous(run_dir), ex, resume and not only, result, echo)
    write_status(result)
    kept = [r.name for r in result.reports if r.previous and r.name in plan.selected]
    if kept:
        echo(f"kept from the previous run (ok, same parameters): {', '.join(kept)}")

    try:
        _drive(result, todo, active, ex, echo, POLL_S[kind] if poll_s is None else poll_s)
    except KeyboardInterrupt:
        live_jobs = False
        for rr in result.reports:
            if rr.status in LIVE_STATUSES and rr.job and not ex.blocking:
                live_jobs = True        # its job carries on without us
            elif rr.status == STATUS_RUNNING:
                rr.status = STATUS_INTERRUPTED
                rr.reason = {"type": "KeyboardInterrupt", "message": "the run was interrupted"}
            elif rr.status == STATUS_QUEUED:
                rr.status = STATUS_NOT_RUN
        result.status = STATUS_RUNNING if live_jobs else STATUS_INTERRUPTED
        result.finished = None if live_jobs else now()
        assign_side_files(result)
        write_status(result)
        echo(f"interrupted; submitted jobs keep running: fishlab status {run_dir}" if live_jobs
             else f"interrupted; see {result.index_html}")
        raise
    _finish(result, echo)
    return result


def status(run: str | Path, renders_dir: str | Path = "renders", *, wait: bool = False,
           poll_s: float | None = None, echo: Callable[[str], None] | None = _stderr_echo) -> RunResult:
    """Look at a run from any shell without blocking: read its run.json, ask the scheduler once about its live
    jobs, collect those that ended (their reports saved, the index rewritten). With `wait`, keep looking until
    none is left. `run` is a run folder or a run name under `renders_dir`."""
    run_dir = Path(run) if (Path(run) / "run.json").is_file() else Path(renders_dir) / str(run)
    data = read_run_json(run_dir)
    if data is None:
        raise RunnerError(f"no run at {run_dir} (no readable run.json there)")
    result = RunResult.from_dict(data)
    result.run_dir = run_dir.resolve()
    echo = echo or (lambda _line: None)
    active: dict[str, Handle] = {}
    ex = None
    if result.executor != "local":
        ex = make_executor(result.executor, result.run_dir, result.run_dir, result.show_code)
        for rr in result.reports:
            h = ex.attach(rr) if rr.status in LIVE_STATUSES else None
            if h is not None:
                active[rr.name] = h
    count = _Count(result)
    while active:
        _poll(result, active, ex, echo, count)
        if not active or not wait:
            break
        time.sleep(POLL_S[result.executor] if poll_s is None else poll_s)
    if result.status == STATUS_RUNNING and ex is not None and not any(
            r.status in LIVE_STATUSES for r in result.reports if r.name in result.executed):
        _finish(result, echo)
    return result


class _Count:
    """Progress over the executed reports: how many ended, of how many."""

    def __init__(self, result: RunResult):
        ex = [r for r in result.reports if r.name in result.executed]
        self.n = len(ex)
        self.done = sum(r.status not in LIVE_STATUSES for r in ex)


def _sort_out(plan, previous: dict[str, dict], ex, resume: bool, result: RunResult, echo):
    """Each report of the plan into result.reports, as one of: to run (returned in `todo`); a job an earlier
    invocation submitted, still live or not yet collected (watched, in `active`); carried over (not selected, or
    with `resume` ok with the same parameters and nothing it needs about to run again)."""
    todo: list[Report] = []
    active: dict[str, Handle] = {}
    for rep in plan.reports:
        old = previous.get(rep.name)
        rr = ReportResult(rep.name, rep.notebook, parameters=rep.parameters)
        live = result_from_dict(old, keep_live=True) if old and old.get("status") in LIVE_STATUSES else None
        h = ex.attach(live) if live is not None else None
        if live is not None and live.job and h is None and rep.name in plan.selected:
            echo(f"warning: {rep.name} has a {live.job.get('executor')} job {live.job.get('id')} from an earlier "
                 f"run that may still be live; running it again with {ex.kind}")
        rerun = {r.name for r in todo} | set(active)
        if h is not None:
            rr = live
            active[rep.name] = h
        elif rep.name not in plan.selected or (
                resume and _still_ok(old, rep, plan.run_dir) and not rerun & set(rep.needs)):
            if old:
                rr = result_from_dict(old)
                rr.previous = True
            else:
                rr.status = STATUS_NOT_RUN
        else:
            todo.append(rep)
        result.reports.append(rr)
    result.executed = [r.name for r in plan.reports if r.name in active or r in todo]
    return todo, active


def _drive(result: RunResult, todo: list[Report], active: dict[str, Handle], ex, echo, poll_s: float) -> None:
    waiting = list(todo)
    count = _Count(result)
    while waiting or active:
        changed = _poll(result, active, ex, echo, count) if active else 0
        for rep in list(waiting):
            held = {r.name for r in waiting}
            if any(x in held or (x in active and not ex.native_dependencies) for x in rep.needs):
                continue                # what it needs has not ended (or, on SLURM, not been submitted)
            waiting.remove(rep)
            rr = result.report(rep.name)
            after = [active[x] for x in rep.needs if x in active]
            if ex.blocking:
                rr.status, rr.started = STATUS_RUNNING, now()
                write_status(result)
                echo(f"[{count.done + 1}/{count.n}] {rep.name} ...")
            try:
                active[rep.name] = ex.submit(rep, rr, after)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:      # noqa: BLE001 - e.g. sbatch refused the job: say so, go on
                rr.status, rr.finished = STATUS_FAILED, now()
                rr.reason = {"type": type(e).__name__,
                             "message": f"the {ex.kind} executor could not run it: {first_line(e)}",
                             "cell_index": None, "execution_count": None, "tail": str(e)[-2000:]}
                count.done += 1
                echo(_ended_line(count, rr))
            if not ex.blocking and rep.name in active:
                rr.status = STATUS_QUEUED
                deps = f" after {', '.join(h.name for h in after)}" if after else ""
                echo(f"{rep.name}: submitted {ex.kind} job {rr.job['id']}{deps}")
            write_status(result)
            changed += 1
            if ex.blocking:
                break                   # one at a time: it has ended already, collect it first
        if active and not changed:
            time.sleep(poll_s)


def _poll(result: RunResult, active: dict[str, Handle], ex, echo, count: _Count) -> int:
    """One look at every live job: record queued -> running, collect the ended ones. Returns the changes."""
    ex.refresh(list(active.values()))
    changed = 0
    for name, h in list(active.items()):
        rr = result.report(name)
        st = ex.state(h)
        if st == DONE:
            ex.collect(h, rr)
            del active[name]
            count.done += 1
            assign_side_files(result)
            echo(_ended_line(count, rr))
        elif st != rr.status:
            rr.status = st
            if st == RUNNING and not rr.started:
                rr.started = now()
            echo(f"{name}: {st} ({ex.kind} job {h.info['id']})")
        else:
            continue
        changed += 1
        write_status(result)
    return changed


def _ended_line(count: _Count, rr: ReportResult) -> str:
    dur = f" ({rr.duration_s:.1f} s)" if rr.duration_s is not None else ""
    msg = f"[{count.done}/{count.n}] {rr.name} {rr.status}{dur}"
    if rr.reason:
        msg += f": {rr.reason.get('type')}: {first_line(rr.reason.get('message'))}"
    return msg


def _finish(result: RunResult, echo) -> None:
    ex = [r for r in result.reports if r.name in result.executed]
    result.status = STATUS_OK if all(r.status == STATUS_OK for r in ex) else STATUS_FAILED
    result.finished = now()
    assign_side_files(result)
    write_status(result)
    bad = [r.name for r in ex if r.status != STATUS_OK]
    if not ex:
        echo(f"{result.run_name}: nothing to run, every report kept from the previous run -> {result.index_html}")
        return
    echo(f"{result.run_name}: {len(ex) - len(bad)}/{len(ex)} ok" + (f", failed: {', '.join(bad)}" if bad else "")
         + f" -> {result.index_html}")


def _still_ok(old: dict | None, rep: Report, run_dir: Path) -> bool:
    """A previous result worth keeping: ok, its files still there, run with the parameters it would get now."""
    if not old or old.get("status") != STATUS_OK:
        return False
    if not all(old.get(k) and (run_dir / old[k]).is_file() for k in ("ipynb", "html")):
        return False
    def same(p):
        return {k: v for k, v in (p or {}).items() if k != "show_progress"}
    return same(old.get("parameters")) == same(rep.parameters)
