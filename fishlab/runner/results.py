"""What a run produces, in memory and in run.json: the statuses, one ReportResult per report, the RunResult."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_TIMEOUT = "timeout"
STATUS_DEAD = "dead kernel"
STATUS_RUNNING = "running"
STATUS_QUEUED = "queued"
STATUS_INTERRUPTED = "interrupted"
STATUS_NOT_RUN = "not run"
STATUS_CANCELLED = "cancelled"      # a job cancelled by the scheduler or a user (scancel)
STATUS_PREEMPTED = "preempted"      # a job preempted and not requeued
FAILURE_STATUSES = (STATUS_FAILED, STATUS_TIMEOUT, STATUS_DEAD, STATUS_INTERRUPTED, STATUS_CANCELLED,
                    STATUS_PREEMPTED)
LIVE_STATUSES = (STATUS_QUEUED, STATUS_RUNNING)
RUN_STATUS_FILE = "run.json"


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
    previous: bool = False                    # carried over from an earlier run (not selected, or kept ok)
    job: dict | None = None                   # {"executor", "id", "folder", "stdout", "stderr", "state"} of a job

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
    executor: str = "local"

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
            "executor": self.executor,
            "executed": list(self.executed),
            "reports": [r.to_dict() for r in self.reports],
            "other_files": self.other_files,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        """The inverse of to_dict (run.json as written; reports keep their status, live ones included)."""
        return cls(d["run"], Path(d["run_dir"]), Path(d["params_file"]),
                   [result_from_dict(r, keep_live=True) for r in d.get("reports", [])], list(d.get("executed", [])),
                   status=d.get("status", STATUS_RUNNING), started=d.get("started"), finished=d.get("finished"),
                   other_files=list(d.get("other_files", [])), show_code=bool(d.get("show_code")),
                   executor=d.get("executor") or "local")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def iso_to_ts(s: str | None) -> float | None:
    """A timestamp written by now() -> seconds since the epoch (None when absent or unreadable)."""
    if not s:
        return None
    try:
        return _dt.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


def first_line(s: Any) -> str:
    s = str(s or "").strip()
    return s.splitlines()[0] if s else ""


def read_run_json(run_dir: Path) -> dict | None:
    """run.json of a run folder, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads((run_dir / RUN_STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_previous(run_dir: Path) -> dict[str, dict]:
    data = read_run_json(run_dir) or {}
    try:
        return {r["name"]: r for r in data.get("reports", []) if isinstance(r, dict) and "name" in r}
    except (TypeError, AttributeError):
        return {}


def result_from_dict(d: dict, keep_live: bool = False) -> ReportResult:
    """A ReportResult from its run.json entry. A queued or running one becomes "not run" (an earlier run that
    never finished) unless `keep_live` (its job may still be alive: the caller checks)."""
    names = {f.name for f in dataclasses.fields(ReportResult)}
    rr = ReportResult(**{k: v for k, v in d.items() if k in names})
    if rr.status in LIVE_STATUSES and not keep_live:
        rr.status = STATUS_NOT_RUN
    return rr

