"""Where a report runs: the one seam between the driver and the kernels.

    ex = make_executor("slurm", run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)
    h = ex.submit(rep, rr, after)   # after: handles of what rep needs that is still queued or running
    ex.refresh([h, ...])            # one scheduler query for every live job
    ex.state(h)                     # "queued" | "running" | "done"
    ex.collect(h, rr)               # a done job's result (or the scheduler's reason it has none) into rr
    h = ex.attach(rr)               # a job submitted earlier (rr.job from run.json), by this or another process

- `local`: the report runs at submit, in this process (papermill, one kernel), one after another. Needs are
  met by the run file's order (a report only needs earlier ones).
- `slurm`: `submitit.SlurmExecutor`, one sbatch job per report with its resources; needs become
  `--dependency=afterany:<job ids>`, so the whole run is queued at once and outlives the submitting process.
- `submitit-local`: `submitit.LocalExecutor`, every report a subprocess job on this machine: the slurm path
  without a cluster (the tests use it). Its jobs start when submitted, so the driver holds a report back until
  what it needs has ended.

Job files live in `<run>/jobs/<report>/` (submitit's pickles, `<id>_0_log.out` / `.err`, for SLURM the sbatch
script `<id>_submission.sh`): on the shared filesystem, like the run folder and the checkpoints.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .classify import classify_job_end, tail
from .execute import execute_report, finish_unfinished, run_report_job
from .plan import EXECUTORS, Report, RunnerError
from .resources import local_parameters, slurm_parameters
from .results import STATUS_FAILED, ReportResult, iso_to_ts, now

JOBS_DIR = "jobs"
QUEUED, RUNNING, DONE = "queued", "running", "done"
# SLURM states (sacct) of a job that has not started / is running; every other state is an end.
_SLURM_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                  "SUSPENDED", "UNKNOWN", "")
_SLURM_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")
# Ends after which a result is expected (or the job comes back, requeued): the result file, written on the
# job's node, may show up here a little later on a shared filesystem; wait that long before calling it lost.
_SLURM_RESULT_EXPECTED = ("COMPLETED", "FAILED", "PREEMPTED")
RESULT_GRACE_S = 60.0
# Report fields a job's result brings back (the rest: the driver's, e.g. parameters, job, previous).
_RESULT_FIELDS = ("status", "duration_s", "started", "finished", "html", "ipynb", "reason", "warnings")


@dataclass
class Handle:
    name: str
    job: Any = None            # a submitit Job; None for a report that ran in this process
    info: dict | None = None   # what run.json keeps of the job (ReportResult.job)


class InProcess:
    """Today's runner: each report executes at submit, in this process."""
    kind = "local"
    blocking = True
    native_dependencies = False

    def __init__(self, run_dir: Path, kernel_cwd: Path, show_code: bool, timeout: float | None,
                 start_timeout: float, tty: str | None):
        self.args = (run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)

    def submit(self, rep: Report, rr: ReportResult, after: list[Handle]) -> Handle:
        execute_report(rep, rr, *self.args)
        rr.finished = now()
        return Handle(rep.name)

    def refresh(self, handles: list[Handle]) -> None:
        pass

    def state(self, h: Handle) -> str:
        return DONE

    def collect(self, h: Handle, rr: ReportResult) -> None:
        pass

    def attach(self, rr: ReportResult) -> Handle | None:
        return None


class Submitit:
    """Each report a submitit job (`cluster` "slurm" or "local"), running fishlab.runner.execute.run_report_job."""
    blocking = False

    def __init__(self, cluster: str, run_dir: Path, kernel_cwd: Path, show_code: bool, timeout: float | None,
                 start_timeout: float):
        import submitit

        self.cluster = cluster
        self.kind = "slurm" if cluster == "slurm" else "submitit-local"
        self.native_dependencies = cluster == "slurm"
        self.run_dir, self.kernel_cwd, self.show_code = run_dir, kernel_cwd, show_code
        self.timeout, self.start_timeout = timeout, start_timeout
        self._executor_class = submitit.SlurmExecutor if cluster == "slurm" else submitit.LocalExecutor
        self._job_class = submitit.SlurmJob if cluster == "slurm" else submitit.LocalJob

    def _rel(self, p: Path) -> str:
        return os.path.relpath(p, self.run_dir)

    def submit(self, rep: Report, rr: ReportResult, after: list[Handle]) -> Handle:
        folder = self.run_dir / JOBS_DIR / rep.name
        ex = self._executor_class(folder)
        if self.cluster == "slurm":
            ex.update_parameters(**slurm_parameters(rep.resources, f"fishlab-{self.run_dir.name}-{rep.name}",
                                                    [h.info["id"] for h in after if h.info]))
        else:
            ex.update_parameters(**local_parameters(rep.resources))
        job = ex.submit(run_report_job, rep, str(self.run_dir), str(self.kernel_cwd), self.show_code,
                        self.timeout, self.start_timeout)
        info = {"executor": self.kind, "id": str(job.job_id), "folder": self._rel(folder),
                "stdout": self._rel(job.paths.stdout), "stderr": self._rel(job.paths.stderr),
                "timeout_min": rep.resources.get("timeout_min"), "state": "SUBMITTED", "submitted": now()}
        if self.cluster == "slurm":
            info["sbatch"] = self._rel(job.paths.submission_file)
        rr.job = info
        return Handle(rep.name, job, info)

    def attach(self, rr: ReportResult) -> Handle | None:
        info = rr.job
        if not info or info.get("executor") != self.kind or not info.get("id"):
            return None
        job = self._job_class(folder=self.run_dir / info["folder"], job_id=str(info["id"]))
        return Handle(rr.name, job, info)

    def refresh(self, handles: list[Handle]) -> None:
        if self.cluster == "slurm" and any(h.job is not None for h in handles):
            self._job_class.watcher.update()        # one sacct call for every registered job

    def state(self, h: Handle) -> str:
        job = h.job
        if job.paths.result_pickle.exists():
            return DONE
        if self.cluster == "slurm":
            st = job.watcher.get_state(job.job_id, mode="cache")
            h.info["state"] = st
            head = st.split()[0].upper() if st.strip() else ""
            if head in _SLURM_WAITING:
                return QUEUED
            if head in _SLURM_RUNNING:
                return RUNNING
            if head in _SLURM_RESULT_EXPECTED:
                seen = h.info.setdefault("ended_seen", time.time())
                if time.time() - seen < RESULT_GRACE_S:
                    return RUNNING
            return DONE
        st = job.state
        if st == "NO PROCESS AND NO RESULT":        # a job another process started: is its controller alive?
            st = "RUNNING" if _pid_alive(job.job_id) else "FINISHED"
        h.info["state"] = st
        return RUNNING if st in ("RUNNING", "UNKNOWN") else DONE

    def collect(self, h: Handle, rr: ReportResult) -> None:
        if not h.job.paths.result_pickle.exists():   # the scheduler ended it: time limit, scancel, memory, node
            rr.status, rr.reason = classify_job_end(h.info.get("state", ""), h.job.stderr() or "",
                                                    h.info.get("timeout_min"))
            self._finish_unfinished(rr)
            return
        try:
            d = h.job.result()
        except Exception as e:          # noqa: BLE001 - the job function raised (a bug, or a broken node env)
            rr.status = STATUS_FAILED
            rr.reason = {"type": "JobError", "message": f"the job failed outside the notebook "
                                                        f"({type(e).__name__}); see its stderr",
                         "cell_index": None, "execution_count": None, "tail": tail(str(e))}
            self._finish_unfinished(rr)
        else:
            for k in _RESULT_FIELDS:
                setattr(rr, k, d.get(k))
            h.info["state"] = "COMPLETED" if self.cluster == "slurm" else "FINISHED"

    def _finish_unfinished(self, rr: ReportResult) -> None:
        rr.finished = now()
        start = iso_to_ts(rr.started)
        rr.duration_s = round(time.time() - start, 3) if start is not None else None
        rr.side_files, rr.warnings = [], []
        finish_unfinished(rr, self.run_dir, self.show_code)


def _pid_alive(pid: str) -> bool:
    """Whether a local job's controller process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):       # no /proc: trust the signal
        return True


def make_executor(kind: str, run_dir: Path, kernel_cwd: Path, show_code: bool = False,
                  timeout: float | None = None, start_timeout: float = 60, tty: str | None = None):
    """The executor named `kind` (one of EXECUTORS). Raises RunnerError when it cannot work here."""
    if kind == "local":
        return InProcess(run_dir, kernel_cwd, show_code, timeout, start_timeout, tty)
    if kind not in EXECUTORS:
        raise RunnerError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    return Submitit("slurm" if kind == "slurm" else "local", run_dir, kernel_cwd, show_code, timeout,
                    start_timeout)


def check_submit_here(kind: str) -> None:
    """SLURM submission needs its commands on PATH (submitit looks for srun); say so before planning jobs."""
    if kind == "slurm":
        import submitit

        if submitit.SlurmExecutor.affinity() <= 0:
            raise RunnerError("--executor slurm: no SLURM on this machine (srun is not on PATH); submit from a "
                              "login node of the cluster, or use --executor local")
