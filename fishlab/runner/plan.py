"""Stage 1, plan: a run file (+ the phase files beside it) -> a RunPlan of reports with their parameters.
Nothing is executed; every user error is a RunnerError raised here, before any kernel starts."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..phases import PhaseError, phase_files
from .resources import ResourceError, check_resources, report_resources

INJECTED_KEYS = ("output_dir", "report_name", "params_dir", "show_progress")
EXECUTORS = ("local", "slurm", "submitit-local")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunnerError(ValueError):
    """A user error (missing or malformed params file, unknown notebook or report). The message is one line
    meant for the terminal; the CLI prints it and exits 2."""



@dataclass
class Report:
    name: str                     # e.g. "10_phase-1b"; the file stem under renders/<run>/
    notebook: str                 # e.g. "10_phase"
    notebook_path: Path
    parameters: dict[str, Any]    # everything papermill injects, incl. the runner-injected keys
    phase: str | None = None
    needs: list[str] = field(default_factory=list)          # reports that must end first (earlier in the run)
    resources: dict[str, Any] = field(default_factory=dict)  # what its job asks for (fishlab.runner.resources)


@dataclass
class RunPlan:
    run_name: str
    params_file: Path
    params_dir: Path
    run_dir: Path
    reports: list[Report]         # every report of the run file, in order
    selected: list[str]           # names to execute (all unless `only`)
    executor: str | None = None   # run.executor of the run file, None when it does not say


def report_name_for(notebook: str, phase: str | None = None, given: str | None = None) -> str:
    """A report's name: `given` when set, else `<notebook>-<phase>` for a phase's report and the notebook's own
    name otherwise. The runner names its reports so; a notebook run by plain papermill calls it to name its
    side files the same way (`papermill 10_phase.ipynb out.ipynb -f params/2c.yaml` -> 10_phase-2c.*)."""
    if given:
        return str(given)
    return f"{notebook}-{phase}" if phase else notebook


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
    unknown = set(spec) - {"name", "notebooks", "executor", "resources"}
    if unknown:
        raise RunnerError(f"{where}: unknown key(s) under 'run': {', '.join(sorted(map(str, unknown)))}")
    executor = spec.get("executor")
    if executor is not None and executor not in EXECUTORS:
        raise RunnerError(f"{where}: run.executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    try:
        run_resources = check_resources(spec.get("resources"), f"{where}: run")
    except ResourceError as e:
        raise RunnerError(str(e)) from None

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
        unknown = set(entry) - {"notebook", "parameters", "for_each_phase", "needs", "resources"}
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
        if not (isinstance(each, bool) or (isinstance(each, list) and each and all(isinstance(x, str) for x in each))):
            raise RunnerError(f"{ewhere}: 'for_each_phase' must be true, false or a list of phase names")
        needs = entry.get("needs") or []
        if isinstance(needs, str):
            needs = [needs]
        if not isinstance(needs, list) or not all(isinstance(x, str) for x in needs):
            raise RunnerError(f"{ewhere}: 'needs' must be a list of notebook or report names")
        try:
            res = report_resources(each, run_resources, check_resources(entry.get("resources"), ewhere))
        except ResourceError as e:
            raise RunnerError(str(e)) from None
        needs = _expand_names(needs, reports, f"{ewhere}: needs", "earlier reports")

        if each:
            if phases is None:
                phases = discover_phases(params_dir)
            if not phases:
                raise RunnerError(f"{ewhere}: for_each_phase but no phase files (YAML with a 'phase' key) "
                                  f"in {params_dir}")
            chosen = phases
            if isinstance(each, list):
                missing = [x for x in each if x not in phases]
                if missing:
                    raise RunnerError(f"{ewhere}: for_each_phase names unknown phase(s) {', '.join(missing)}; "
                                      f"phase files in {params_dir}: {', '.join(phases)}")
                chosen = {ph: phases[ph] for ph in each}
            for ph, (_, pkeys) in chosen.items():
                reports.append(Report(report_name_for(nb, ph), nb, nb_path, {**shared, **pkeys, **eparams}, phase=ph,
                                      needs=needs, resources=dict(res)))
        else:
            reports.append(Report(report_name_for(nb), nb, nb_path, {**shared, **eparams}, needs=needs,
                                  resources=res))

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
        selected = _expand_names(list(only), reports, "unknown report", "this run has")
    return RunPlan(name, params_file.resolve(), params_dir, run_dir, reports, selected, executor)


def _expand_names(names: list[str], reports: list[Report], what: str, among: str) -> list[str]:
    """Report names (or notebook names, meaning all their reports) -> report names, in run order."""
    by_nb: dict[str, list[str]] = {}
    for r in reports:
        by_nb.setdefault(r.notebook, []).append(r.name)
    known = {r.name for r in reports}
    pick: set[str] = set()
    for o in names:
        o = o.removesuffix(".ipynb")
        if o in known:
            pick.add(o)
        elif o in by_nb:
            pick.update(by_nb[o])
        else:
            raise RunnerError(f"{what} '{o}'; {among}: {', '.join(r.name for r in reports) or 'none'}")
    return [r.name for r in reports if r.name in pick]

