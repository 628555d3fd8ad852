"""The notebook runner: a params file -> executed notebooks + self-contained HTML reports + an index.

    result = run("params/default.yaml")          # -> renders/default/{index.html, run.json, <report>.{ipynb,html}}
    result.ok                                    # False if any report failed, timed out or killed its kernel

The stages, one module each: `plan` (run file -> reports and their parameters), `execute` (one report through
papermill in its own kernel), `classify` (why it stopped; the notebook marked to say so), `render` (notebook ->
offline HTML), `index` (side files, run.json, index.html); `results` holds the statuses and result records,
`executors` is the seam where a report runs (here, or as a SLURM / local submitit job), `resources` what a job
asks for, `driver` runs the stages over a plan (and `status` watches a run from any shell), `notebooks` has the
helpers notebooks and committed files need.

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
            for_each_phase: true          # one report per phase file: 10_phase-<phase> (or a list of phase names)
          - notebook: 90_summary
            needs: [10_phase]             # runs after these (notebook or report names of earlier entries)
            resources: {mem_gb: 16}       # what its job asks for (fishlab.runner.resources); optional

  `run:` may also say `executor: local|slurm|submitit-local` (the CLI's `--executor` wins) and `resources:`
  for every report.

Parameters of a report, later wins: shared keys < phase keys < entry `parameters` < `overrides` (the CLI's
`--checkpoint`), plus the injected keys `output_dir` (absolute `renders/<run>/`), `report_name`, `params_dir`
(absolute params folder) and `show_progress` (bool). The injected names are reserved: a params file may not
set them. Every value must be a plain YAML type (null, bool, int, float, str, list, str-keyed mapping).

Execution
---------
- One papermill execution (one kernel process, kernel `python3`) per report: with the `local` executor in this
  process, sequentially; with `slurm` / `submitit-local` in one job per report (fishlab.runner.executors), a
  report held until what it `needs` has ended, `run.json` / `index.html` rewritten as jobs change state. The
  kernel's working directory is the *project root*, i.e. the parent of the notebooks folder (`cwd=` overrides
  it), so relative paths in notebooks mean what they mean on the command line at the repo root. The kernel's
  own stdout/stderr (C-level writes, ipykernel warnings) go to a temp log whose tail is quoted when it dies.
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
written at the start with the run "running" and rewritten after every change, so an interrupted run never
leaves an index that claims success. Side files: every `*.json` in the run folder except `run.json`; a file is
listed next to report R when its name starts with `R.` or when it was written while R was running, otherwise
under "run-wide files". Files older than the report's execution are flagged stale.
"""
from __future__ import annotations
from .classify import MARKER_TAG
from .driver import run, status
from .execute import KERNEL_NAME, PROGRESS_TTY_ENV
from .index import render_index
from .notebooks import check_notebook_clean, strip_outputs, tqdm_kwargs
from .plan import (EXECUTORS, INJECTED_KEYS, Report, RunnerError, RunPlan, discover_phases, load_yaml, plan_run,
                   report_name_for)
from .render import render_html, strip_external_resources
from .results import (FAILURE_STATUSES, RUN_STATUS_FILE, STATUS_CANCELLED, STATUS_DEAD, STATUS_FAILED,
                      STATUS_INTERRUPTED, STATUS_NOT_RUN, STATUS_OK, STATUS_PREEMPTED, STATUS_QUEUED, STATUS_RUNNING,
                      STATUS_TIMEOUT, ReportResult, RunResult)

__all__ = [
    "RunnerError", "Report", "RunPlan", "ReportResult", "RunResult",
    "load_yaml", "discover_phases", "plan_run", "run", "status", "report_name_for",
    "tqdm_kwargs", "strip_outputs", "check_notebook_clean",
    "STATUS_OK", "STATUS_FAILED", "STATUS_TIMEOUT", "STATUS_DEAD", "STATUS_RUNNING", "STATUS_QUEUED",
    "STATUS_INTERRUPTED", "STATUS_NOT_RUN", "STATUS_CANCELLED", "STATUS_PREEMPTED", "FAILURE_STATUSES", "EXECUTORS",
    "INJECTED_KEYS", "RUN_STATUS_FILE", "PROGRESS_TTY_ENV", "KERNEL_NAME", "MARKER_TAG",
    "render_html", "render_index", "strip_external_resources",
]
