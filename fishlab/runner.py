"""The notebook runner: a params file -> executed notebooks + self-contained HTML reports + an index.

    result = run("params/default.yaml")          # -> renders/default/{index.html, run.json, <report>.{ipynb,html}}
    result.ok                                    # False if any report failed, timed out or killed its kernel

Params files (the contract)
---------------------------
- *Phase files* (`params/<x>.yaml` whose top level has a `phase` key): flat papermill parameters of one
  quantization phase. Discovered next to the run file, sorted by phase name.
- *Run files* (e.g. `params/default.yaml`): flat shared parameters plus one `run:` key::

      checkpoint: null
      preset: demo
      run:
        name: default
        notebooks:
          - notebook: 00_architecture
            parameters: {foo: 1}          # optional
          - notebook: 10_phase
            for_each_phase: true          # one report per phase file: 10_phase-<phase>

Parameters of a report, later wins: shared keys < phase keys < entry `parameters` < `overrides` (the CLI's
`--checkpoint`), plus the injected keys `output_dir` (absolute `renders/<run>/`), `report_name`, `params_dir`
(absolute params folder) and `show_progress` (bool). The injected names are reserved: a params file may not
set them. Every value must be a plain YAML type (null, bool, int, float, str, list, str-keyed mapping).

Execution
---------
- One papermill execution (one kernel process, kernel `python3`) per report, sequentially. The kernel's working
  directory is the *project root*, i.e. the parent of the notebooks folder (`cwd=` overrides it), so relative
  paths in notebooks mean what they mean on the command line at the repo root. The kernel's own stdout/stderr
  (C-level writes, ipykernel warnings) go to a temp log whose tail is quoted when the kernel dies.
- `timeout` is papermill's per-cell `execution_timeout` in seconds (None: no limit).
- Papermill marks an ordinary exception itself (red "An Exception was encountered" cell,
  `metadata.papermill.exception = true`). It does NOT mark a dead kernel (nbclient `DeadKernelError`) nor a cell
  timeout (`CellTimeoutError`): with papermill 2.7 the output notebook then claims every cell "completed",
  `exception: false`, and the notebook-level `exception` is null. fishlab classifies those (also by the kernel
  process's exit code), finds the cell that was running (the last one papermill started), marks it failed, sets
  later cells back to "pending", inserts a styled markdown cell at the top and an anchor cell before the culprit,
  and records `metadata.fishlab = {status, reason, cell_index, ...}` in every saved notebook (ok ones too).
- Progress goes to stderr as plain lines; papermill's progress bar is off. When stderr is a terminal,
  `show_progress=True` is passed and `FISHLAB_PROGRESS_TTY` names that terminal in the kernel's environment;
  notebooks use `tqdm(..., **tqdm_kwargs(show_progress))` to draw a text bar on the terminal, never into the
  report (ipykernel would otherwise copy stderr into the notebook).

Outputs (all written atomically: temp file in the same folder + os.replace)
-------
`renders/<run>/<report>.ipynb` (executed, marked), `<report>.html` (nbconvert lab template, code hidden unless
`show_code`, images embedded as base64, no CDN scripts: require.js / MathJax / mermaid / widget blocks are
emptied and any remaining external <script src>/<link href> is stripped), `run.json` and `index.html`. Both are
written at the start with the run "running" and rewritten after every report, so an interrupted run never
leaves an index that claims success. Side files: every `*.json` in the run folder except `run.json`; a file is
listed next to report R when its name starts with `R.` or when it was written while R was running, otherwise
under "run-wide files". Files older than the report's execution are flagged stale.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import html as _html
import json
import logging
import os
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .io import write_json_atomic, write_text_atomic
from .phases import PhaseError, phase_files

__all__ = [
    "RunnerError", "Report", "RunPlan", "ReportResult", "RunResult",
    "load_yaml", "discover_phases", "plan_run", "run",
    "tqdm_kwargs", "strip_outputs", "check_notebook_clean",
    "STATUS_OK", "STATUS_FAILED", "STATUS_TIMEOUT", "STATUS_DEAD",
]

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_TIMEOUT = "timeout"
STATUS_DEAD = "dead kernel"
STATUS_RUNNING = "running"
STATUS_QUEUED = "queued"
STATUS_INTERRUPTED = "interrupted"
STATUS_NOT_RUN = "not run"
FAILURE_STATUSES = (STATUS_FAILED, STATUS_TIMEOUT, STATUS_DEAD, STATUS_INTERRUPTED)

INJECTED_KEYS = ("output_dir", "report_name", "params_dir", "show_progress")
RUN_STATUS_FILE = "run.json"
PROGRESS_TTY_ENV = "FISHLAB_PROGRESS_TTY"
KERNEL_NAME = "python3"
MARKER_TAG = "fishlab-status-cell"
_PAPERMILL_MARKER_TAG = "papermill-error-cell-tag"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class RunnerError(ValueError):
    """A user error (missing or malformed params file, unknown notebook or report). The message is one line
    meant for the terminal; the CLI prints it and exits 2."""


# ----------------------------------------------------------------------------------------------------
# Params files -> a plan
# ----------------------------------------------------------------------------------------------------

@dataclass
class Report:
    name: str                     # e.g. "10_phase-1b"; the file stem under renders/<run>/
    notebook: str                 # e.g. "10_phase"
    notebook_path: Path
    parameters: dict[str, Any]    # everything papermill injects, incl. the runner-injected keys
    phase: str | None = None


@dataclass
class RunPlan:
    run_name: str
    params_file: Path
    params_dir: Path
    run_dir: Path
    reports: list[Report]         # every report of the run file, in order
    selected: list[str]           # names to execute (all unless `only`)


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML file; a missing file or bad YAML raises RunnerError with a one-line message."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"params file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RunnerError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise RunnerError(f"{path}: not UTF-8 text ({e.reason})") from None


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RunnerError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise RunnerError(f"{where}: {type(value).__name__} value {value!r} is not a plain YAML type "
                      f"(quote it to make it a string)")


def _check_params(mapping: dict, where: str) -> None:
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise RunnerError(f"{where}: parameter name {k!r} is not a string")
        if k in INJECTED_KEYS:
            raise RunnerError(f"{where}: '{k}' is set by the runner and may not be given")
        if not k.isidentifier():
            raise RunnerError(f"{where}: parameter name {k!r} is not a valid Python identifier")
        _check_plain(v, f"{where}: {k}")


def discover_phases(params_dir: str | Path) -> dict[str, tuple[Path, dict]]:
    """Phase files in `params_dir` (fishlab.phases.phase_files: every YAML with a top-level `phase` key,
    validated as a Phase), checked as papermill parameters. Returns {phase name: (path, keys)} sorted by name."""
    try:
        files = phase_files(params_dir)
    except PhaseError as e:
        raise RunnerError(f"{e} (read while looking for phase files)") from None
    for name, (p, data) in files.items():
        if "run" in data:
            raise RunnerError(f"{p}: a file has either a 'phase' key (phase file) or a 'run' key (run file), "
                              f"not both")
        if not _NAME_RE.match(name):
            raise RunnerError(f"{p}: phase name {name!r} may only use letters, digits, '.', '_' and '-'")
        _check_params(data, str(p))
    return files


def plan_run(params_file: str | Path, run_name: str | None = None, notebooks_dir: str | Path = "notebooks",
             renders_dir: str | Path = "renders", only: Iterable[str] | None = None,
             overrides: dict[str, Any] | None = None, show_progress: bool = False) -> RunPlan:
    """Read a run file and expand it into reports (no execution). Raises RunnerError on user errors."""
    params_file = Path(params_file)
    data = load_yaml(params_file)
    where = str(params_file)
    if not isinstance(data, dict):
        raise RunnerError(f"{where}: top level must be a mapping of parameters plus a 'run:' key")
    if "phase" in data and "run" not in data:
        raise RunnerError(f"{where} is a phase file (it has a 'phase' key); pass a run file such as "
                          f"params/default.yaml")
    if "run" not in data:
        raise RunnerError(f"{where}: no 'run:' key (expected run: {{name: ..., notebooks: [...]}})")
    spec = data["run"]
    shared = {k: v for k, v in data.items() if k != "run"}
    _check_params(shared, where)
    if not isinstance(spec, dict):
        raise RunnerError(f"{where}: 'run' must be a mapping with 'name' and 'notebooks'")
    unknown = set(spec) - {"name", "notebooks"}
    if unknown:
        raise RunnerError(f"{where}: unknown key(s) under 'run': {', '.join(sorted(map(str, unknown)))}")

    name = run_name if run_name is not None else spec.get("name", params_file.stem)
    name = str(name)
    if not _NAME_RE.match(name):
        raise RunnerError(f"run name {name!r} may only use letters, digits, '.', '_' and '-'")

    entries = spec.get("notebooks")
    if not isinstance(entries, list) or not entries:
        raise RunnerError(f"{where}: 'run.notebooks' must be a non-empty list")

    overrides = dict(overrides or {})
    _check_params(overrides, "overrides")
    notebooks_dir = Path(notebooks_dir).resolve()
    params_dir = params_file.resolve().parent
    run_dir = Path(renders_dir).resolve() / name
    phases: dict[str, tuple[Path, dict]] | None = None

    reports: list[Report] = []
    for i, entry in enumerate(entries):
        ewhere = f"{where}: run.notebooks[{i}]"
        if isinstance(entry, str):
            entry = {"notebook": entry}
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise RunnerError(f"{ewhere}: expected a mapping with a 'notebook' key")
        unknown = set(entry) - {"notebook", "parameters", "for_each_phase"}
        if unknown:
            raise RunnerError(f"{ewhere}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        nb = entry["notebook"]
        if not isinstance(nb, str) or not _NAME_RE.match(nb.removesuffix(".ipynb")):
            raise RunnerError(f"{ewhere}: bad notebook name {nb!r}")
        nb = nb.removesuffix(".ipynb")
        nb_path = notebooks_dir / f"{nb}.ipynb"
        if not nb_path.is_file():
            raise RunnerError(f"unknown notebook '{nb}' (no {nb_path}) in {where}")
        eparams = entry.get("parameters") or {}
        if not isinstance(eparams, dict):
            raise RunnerError(f"{ewhere}: 'parameters' must be a mapping")
        _check_params(eparams, ewhere)
        each = entry.get("for_each_phase", False)
        if not isinstance(each, bool):
            raise RunnerError(f"{ewhere}: 'for_each_phase' must be true or false")

        if each:
            if phases is None:
                phases = discover_phases(params_dir)
            if not phases:
                raise RunnerError(f"{ewhere}: for_each_phase but no phase files (YAML with a 'phase' key) "
                                  f"in {params_dir}")
            for ph, (_, pkeys) in phases.items():
                reports.append(Report(f"{nb}-{ph}", nb, nb_path, {**shared, **pkeys, **eparams}, phase=ph))
        else:
            reports.append(Report(nb, nb, nb_path, {**shared, **eparams}))

    seen: set[str] = set()
    for r in reports:
        if r.name in seen:
            raise RunnerError(f"{where}: report '{r.name}' appears twice (list a notebook once)")
        seen.add(r.name)
        r.parameters.update(overrides)
        r.parameters.update(output_dir=str(run_dir), report_name=r.name, params_dir=str(params_dir),
                            show_progress=bool(show_progress))

    selected = [r.name for r in reports]
    if only:
        only = list(only)
        names = {r.name for r in reports}
        by_nb: dict[str, list[str]] = {}
        for r in reports:
            by_nb.setdefault(r.notebook, []).append(r.name)
        pick: set[str] = set()
        for o in only:
            o = o.removesuffix(".ipynb")
            if o in names:
                pick.add(o)
            elif o in by_nb:
                pick.update(by_nb[o])
            else:
                raise RunnerError(f"unknown report '{o}'; this run has: {', '.join(r.name for r in reports)}")
        selected = [r.name for r in reports if r.name in pick]
    return RunPlan(name, params_file.resolve(), params_dir, run_dir, reports, selected)


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------

@dataclass
class ReportResult:
    name: str
    notebook: str
    status: str = STATUS_QUEUED
    duration_s: float | None = None
    started: str | None = None
    finished: str | None = None
    html: str | None = None                   # file names relative to the run folder
    ipynb: str | None = None
    side_files: list[dict] = field(default_factory=list)   # [{"name":..., "stale": bool}]
    reason: dict | None = None                # {"type", "message", "cell_index", "execution_count", "tail"}
    warnings: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    previous: bool = False                    # carried over from an earlier run (not selected by `only`)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    run_name: str
    run_dir: Path
    params_file: Path
    reports: list[ReportResult]
    executed: list[str]
    status: str = STATUS_RUNNING
    started: str | None = None
    finished: str | None = None
    other_files: list[dict] = field(default_factory=list)
    show_code: bool = False

    @property
    def ok(self) -> bool:
        """True only when every executed report is ok."""
        ex = [r for r in self.reports if r.name in self.executed]
        return self.status != STATUS_RUNNING and all(r.status == STATUS_OK for r in ex)

    @property
    def index_html(self) -> Path:
        return self.run_dir / "index.html"

    def report(self, name: str) -> ReportResult:
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "schema": "fishlab.run/1",
            "run": self.run_name,
            "status": self.status,
            "ok": self.ok if self.status != STATUS_RUNNING else None,
            "params_file": str(self.params_file),
            "run_dir": str(self.run_dir),
            "started": self.started,
            "finished": self.finished,
            "show_code": self.show_code,
            "executed": list(self.executed),
            "reports": [r.to_dict() for r in self.reports],
            "other_files": self.other_files,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------

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

    previous = _read_previous(run_dir)
    result = RunResult(plan.run_name, run_dir, plan.params_file, [], list(plan.selected), started=_now(),
                       show_code=show_code)
    for rep in plan.reports:
        rr = ReportResult(rep.name, rep.notebook, parameters=rep.parameters)
        if rep.name not in plan.selected:
            old = previous.get(rep.name)
            if old:
                rr = _result_from_dict(old)
                rr.previous = True
            else:
                rr.status = STATUS_NOT_RUN
        result.reports.append(rr)
    _write_status(result)

    todo = [r for r in plan.reports if r.name in plan.selected]
    n = len(todo)
    try:
        for i, rep in enumerate(todo, 1):
            rr = result.report(rep.name)
            rr.status = STATUS_RUNNING
            rr.started = _now()
            _write_status(result)
            echo(f"[{i}/{n}] {rep.name} ...")
            _run_one(rep, rr, run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)
            rr.finished = _now()
            _assign_side_files(result)
            _write_status(result)
            msg = f"[{i}/{n}] {rep.name} {rr.status} ({rr.duration_s:.1f} s)"
            if rr.reason:
                msg += f": {rr.reason.get('type')}: {_first_line(rr.reason.get('message'))}"
            echo(msg)
    except KeyboardInterrupt:
        for rr in result.reports:
            if rr.status == STATUS_RUNNING:
                rr.status = STATUS_INTERRUPTED
                rr.reason = {"type": "KeyboardInterrupt", "message": "the run was interrupted"}
            elif rr.status == STATUS_QUEUED:
                rr.status = STATUS_NOT_RUN
        result.status = STATUS_INTERRUPTED
        result.finished = _now()
        _assign_side_files(result)
        _write_status(result)
        echo(f"interrupted; see {result.index_html}")
        raise
    result.status = STATUS_OK if all(
        r.status == STATUS_OK for r in result.reports if r.name in result.executed) else STATUS_FAILED
    result.finished = _now()
    _assign_side_files(result)
    _write_status(result)
    bad = [r for r in result.reports if r.name in result.executed and r.status != STATUS_OK]
    echo(f"{plan.run_name}: {n - len(bad)}/{n} ok" + (f", failed: {', '.join(r.name for r in bad)}" if bad else "")
         + f" -> {result.index_html}")
    return result


def _first_line(s: Any) -> str:
    s = str(s or "").strip()
    return s.splitlines()[0] if s else ""


def _read_previous(run_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((run_dir / RUN_STATUS_FILE).read_text(encoding="utf-8"))
        return {r["name"]: r for r in data.get("reports", []) if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _result_from_dict(d: dict) -> ReportResult:
    names = {f.name for f in dataclasses.fields(ReportResult)}
    rr = ReportResult(**{k: v for k, v in d.items() if k in names})
    if rr.status in (STATUS_RUNNING, STATUS_QUEUED):   # an earlier run that never finished
        rr.status = STATUS_NOT_RUN
    return rr


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


def _run_one(rep: Report, rr: ReportResult, run_dir: Path, kernel_cwd: Path, show_code: bool,
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

    status, reason = _classify(error, nb, exit_code, kernel_log, timeout, capture.records)
    rr.status, rr.reason = status, reason
    _mark_notebook(nb, rep, rr, final_ipynb)
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


def _running_cell_index(nb) -> int | None:
    """The cell that was executing when papermill stopped: the last one it started."""
    idx = None
    for i, c in enumerate(nb.cells):
        if c.get("metadata", {}).get("papermill", {}).get("start_time"):
            idx = i
    return idx


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in _ANSI_RE.sub("", text or "").rstrip().splitlines()
             if ln.strip() and "running over TCP without encryption" not in ln]
    return "\n".join(lines[-n:])


def _classify(error, nb, exit_code, kernel_log, timeout, records) -> tuple[str, dict | None]:
    if error is None:
        return STATUS_OK, None
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    cell = _running_cell_index(nb)
    reason: dict[str, Any] = {"type": type(error).__name__, "message": str(error).strip(),
                              "cell_index": cell, "execution_count": None, "tail": ""}
    if isinstance(error, PapermillExecutionError):
        reason.update(type=error.ename, message=str(error.evalue), execution_count=error.exec_count,
                      tail=_tail("\n".join(error.traceback)))
        for i, c in enumerate(nb.cells):   # the failed cell (papermill inserted marker cells before it)
            if c.get("metadata", {}).get("papermill", {}).get("exception"):
                reason["cell_index"] = i
        return STATUS_FAILED, reason
    if isinstance(error, CellTimeoutError) or (isinstance(error, TimeoutError) and cell is not None):
        reason["message"] = (f"a cell ran longer than the {timeout:g} s cell timeout" if timeout
                             else _first_line(error))
        reason["tail"] = _tail(str(error))
        return STATUS_TIMEOUT, reason
    died = isinstance(error, DeadKernelError) or "kernel died" in str(error).lower() or (
        exit_code is not None and exit_code != 0 and not isinstance(error, (OSError, ValueError)))
    if died:
        how = _describe_exit(exit_code)
        when = "while running a cell" if cell is not None else "before running any cell"
        reason["message"] = f"the kernel died {when} ({how})"
        log_lines = "\n".join(r.getMessage() for r in records if r.levelno >= logging.ERROR)
        reason["tail"] = _tail(kernel_log) or _tail(log_lines)
        return STATUS_DEAD, reason
    reason["tail"] = _tail(str(error))
    return STATUS_FAILED, reason


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
              STATUS_TIMEOUT: ("#9a6700", "#fff4d6"), STATUS_DEAD: ("#6e1fb4", "#f3e8fd")}
    fg, bg = colors.get(kind, ("#b42318", "#fdecea"))
    idattr = f' id="{anchor}"' if anchor else ""
    pre = (f'<pre style="margin:0.5em 0 0;white-space:pre-wrap;font-size:0.85em;color:#333">'
           f'{_html.escape(detail)}</pre>') if detail else ""
    return (f'<div{idattr} style="border:2px solid {fg};background:{bg};color:{fg};padding:0.6em 1em;'
            f'border-radius:6px;font-family:Helvetica,Arial,sans-serif;font-size:1.1em">'
            f'<strong>fishlab: {_html.escape(kind.upper())}</strong> &mdash; {text}{pre}</div>')


def _mark_notebook(nb, rep: Report, rr: ReportResult, final_path: Path) -> None:
    import nbformat

    nb.cells = [c for c in nb.cells if MARKER_TAG not in c.get("metadata", {}).get("tags", [])]
    pm_meta = nb.metadata.setdefault("papermill", {})
    pm_meta["output_path"] = str(final_path)
    for key in ("widgets",):            # no stale widget state in reports
        nb.metadata.pop(key, None)
    reason = rr.reason or {}
    nb.metadata["fishlab"] = {"status": rr.status, "report": rep.name, "notebook": rep.notebook,
                              "duration_s": rr.duration_s, "reason": reason or None}
    if rr.status not in (STATUS_TIMEOUT, STATUS_DEAD):
        if rr.status == STATUS_FAILED and not any(
                _PAPERMILL_MARKER_TAG in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            top = nbformat.v4.new_markdown_cell(_marker_html(
                STATUS_FAILED, _html.escape(f"{reason.get('type')}: {_first_line(reason.get('message'))}"),
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
        what = ("timed out" if rr.status == STATUS_TIMEOUT else "killed its kernel")
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
    label = "A cell timed out" if rr.status == STATUS_TIMEOUT else "The kernel died"
    top = nbformat.v4.new_markdown_cell(_marker_html(
        rr.status, f"{label} {where}: {_html.escape(reason.get('message', ''))}. "
                   f"Cells after it did not run.", reason.get("tail", "")))
    top.metadata["tags"] = [MARKER_TAG]
    nb.cells.insert(0, top)
    if idx is not None:     # index of the culprit in the saved notebook (after the two inserted cells)
        reason["cell_index"] = idx + 2


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------

# The lab template minus everything that loads from a CDN (require.js, MathJax, mermaid, widget manager).
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_EXTERNAL_SCRIPT_RE = re.compile(
    r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>.*?</script\s*>", re.I | re.S)
_EXTERNAL_LINK_RE = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I)
_WIDGET_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def strip_external_resources(html_text: str) -> str:
    """Remove <script src=http...> and <link href=http...> tags (a safety net behind the offline template)."""
    return _EXTERNAL_LINK_RE.sub("", _EXTERNAL_SCRIPT_RE.sub("", html_text))


def render_html(nb, show_code: bool = False, title: str | None = None) -> str:
    """A self-contained HTML page for an executed notebook: lab template, images inline as base64, no
    external scripts or stylesheets, no widget JS; code cells hidden unless `show_code`."""
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for c in nb.cells:
        for o in c.get("outputs", []):
            data = o.get("data")
            if data:
                for m in _WIDGET_MIME:
                    data.pop(m, None)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    quiet = logging.getLogger("fishlab.runner.nbconvert")   # e.g. "Alternative text is missing on 1 image(s)"
    quiet.setLevel(logging.ERROR)
    exporter.log = quiet
    exporter.raw_template = _OFFLINE_TEMPLATE
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    if not show_code:
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
    resources = {"metadata": {"name": title}} if title else None
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return strip_external_resources(body)


# ----------------------------------------------------------------------------------------------------
# Side files, run.json, index.html
# ----------------------------------------------------------------------------------------------------

def _iso_to_ts(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return _dt.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


def _assign_side_files(result: RunResult) -> None:
    run_dir = result.run_dir
    files = sorted(p for p in run_dir.glob("*.json") if p.is_file() and p.name != RUN_STATUS_FILE
                   and not p.name.startswith("."))
    by_name = sorted(result.reports, key=lambda r: -len(r.name))   # longest prefix first
    windows = []
    for r in result.reports:
        a, b = _iso_to_ts(r.started), _iso_to_ts(r.finished)
        if r.name in result.executed and a is not None:
            windows.append((r, a, b if b is not None else time.time()))
    for r in result.reports:
        if not r.previous:
            r.side_files = []
    other = []
    for p in files:
        mtime = p.stat().st_mtime
        owner = next((r for r in by_name if p.name.startswith(r.name + ".")), None)
        if owner is None:
            owner = next((r for r, a, b in windows if a <= mtime <= b), None)
        if owner is None or owner.previous:
            if owner is None:
                other.append({"name": p.name, "stale": True})
            continue
        start = _iso_to_ts(owner.started)
        stale = owner.name not in result.executed or start is None or mtime < start
        owner.side_files.append({"name": p.name, "stale": bool(stale)})
    result.other_files = other


def _write_status(result: RunResult) -> None:
    write_json_atomic(result.run_dir / RUN_STATUS_FILE, result.to_dict())
    write_text_atomic(result.run_dir / "index.html", render_index(result))


_INDEX_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em} .meta{color:#57606a;margin-bottom:1.2em;font-size:.9em}
table{border-collapse:collapse;width:100%;font-size:.92em} th,td{border-bottom:1px solid #d0d7de;
padding:.45em .6em;text-align:left;vertical-align:top} th{background:#f6f8fa}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.1em .55em;border-radius:1em;font-weight:600;font-size:.85em;white-space:nowrap}
.s-ok{background:#dafbe1;color:#1a7f37} .s-failed,.s-interrupted{background:#ffebe9;color:#b42318}
.s-timeout{background:#fff4d6;color:#9a6700} .s-dead-kernel{background:#f3e8fd;color:#6e1fb4}
.s-running{background:#ddf4ff;color:#0969da} .s-queued,.s-not-run{background:#eaeef2;color:#57606a}
pre{white-space:pre-wrap;margin:.3em 0 0;font-size:.85em;background:#f6f8fa;padding:.4em;border-radius:4px}
.stale{color:#8c959f} .prev{color:#8c959f;font-size:.85em} a{color:#0969da}
ul.files{margin:0;padding-left:1.1em}
"""


def _link(name: str | None, label: str) -> str:
    if not name:
        return ""
    return f'<a href="{_html.escape(urllib.parse.quote(name))}">{_html.escape(label)}</a>'


def render_index(result: RunResult) -> str:
    e = _html.escape
    ex = [r for r in result.reports if r.name in result.executed]
    counts: dict[str, int] = {}
    for r in ex:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    rows = []
    for i, r in enumerate(result.reports, 1):
        cls = "s-" + r.status.replace(" ", "-")
        dur = f"{r.duration_s:.1f} s" if r.duration_s is not None else ""
        links = " &middot; ".join(x for x in (_link(r.html, "html"), _link(r.ipynb, "ipynb")) if x)
        files = ""
        if r.side_files:
            items = []
            for f in r.side_files:
                note = ' <span class="stale">(stale: from an earlier run)</span>' if f.get("stale") else ""
                items.append(f"<li>{_link(f['name'], f['name'])}{note}</li>")
            files = '<ul class="files">' + "".join(items) + "</ul>"
        reason = ""
        if r.reason:
            rs = r.reason
            head = f"{rs.get('type') or ''}: {_first_line(rs.get('message'))}"
            cell = rs.get("cell_index")
            if cell is not None:
                head += f" (cell {cell})"
            tail = rs.get("tail") or ""
            reason = (f"<details><summary>{e(head)}</summary><pre>{e(tail)}</pre></details>" if tail
                      else e(head))
        if r.warnings:
            reason += "".join(f'<div class="prev">warning: {e(w)}</div>' for w in r.warnings)
        prev = ' <span class="prev">(from an earlier run)</span>' if r.previous else ""
        rows.append(
            f'<tr id="{e(r.name)}"><td class="num">{i}</td><td>{e(r.name)}{prev}</td>'
            f'<td><span class="badge {cls}">{e(r.status)}</span></td><td class="num">{dur}</td>'
            f"<td>{links}</td><td>{files}</td><td>{reason}</td></tr>")
    other = ""
    if result.other_files:
        other = ("<h2>Run-wide files</h2><ul>" + "".join(
            f"<li>{_link(f['name'], f['name'])}</li>" for f in result.other_files) + "</ul>")
    refresh = '<meta http-equiv="refresh" content="15">' if result.status == STATUS_RUNNING else ""
    run_cls = "s-" + result.status.replace(" ", "-")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>fishlab run {e(result.run_name)}: {e(result.status)}</title>
<style>{_INDEX_CSS}</style></head>
<body>
<h1>fishlab run <code>{e(result.run_name)}</code> <span class="badge {run_cls}">{e(result.status)}</span></h1>
<div class="meta">params: <code>{e(str(result.params_file))}</code> &middot; started {e(result.started or "")}
{("&middot; finished " + e(result.finished)) if result.finished else ""} &middot; {e(summary)}
&middot; {_link(RUN_STATUS_FILE, RUN_STATUS_FILE)}</div>
<table>
<thead><tr><th>#</th><th>report</th><th>status</th><th>duration</th><th>open</th><th>side files</th>
<th>reason</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{other}
</body></html>
"""


# ----------------------------------------------------------------------------------------------------
# Helpers for notebooks
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Committed notebooks stay clean
# ----------------------------------------------------------------------------------------------------

_EXEC_TAGS = ("injected-parameters", _PAPERMILL_MARKER_TAG, MARKER_TAG)
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
