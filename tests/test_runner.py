"""fishlab.runner and `fishlab run`: params expansion, CLI errors, clean notebooks, and one integration run of
throwaway notebooks that succeed, raise, kill their kernel and time out."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from fishlab import cli, runner
from fishlab.runner import RunnerError, check_notebook_clean, plan_run, strip_outputs

EXTERNAL_URL = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)
PARAMS_CELL = "output_dir = '.'\nreport_name = 'x'\nparams_dir = '.'\nshow_progress = False\nseed = 0\n"


def write_notebook(path: Path, *cells: str, params: str = PARAMS_CELL) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells_ = [nbformat.v4.new_markdown_cell(f"# {path.stem}")]
    if params is not None:
        p = nbformat.v4.new_code_cell(params)
        p.metadata["tags"] = ["parameters"]
        cells_.append(p)
    cells_ += [nbformat.v4.new_code_cell(textwrap.dedent(c).strip()) for c in cells]
    nb.cells = cells_
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ----------------------------------------------------------------------------------------------------
# params expansion
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path):
    for nb in ("00_architecture", "10_phase", "20_summary"):
        write_notebook(tmp_path / "notebooks" / f"{nb}.ipynb", "pass")
    write(tmp_path / "params" / "2a.yaml", """
        phase: "2a"
        method: int
        bits: 2
        group_size: 64
        target: all
        scale_dtype: float16
        description: two-bit
    """)
    write(tmp_path / "params" / "1b.yaml", """
        phase: "1b"
        method: int
        bits: 4
        group_size: 128
        target: slow
    """)
    write(tmp_path / "params" / "notes.yaml", "just: a mapping without phase\n")
    write(tmp_path / "params" / "default.yaml", """
        checkpoint: null
        preset: demo
        scale_dtype: float32
        bits: 16
        run:
          name: default
          notebooks:
            - notebook: 00_architecture
              parameters: {preset: s2-pro}
            - notebook: 10_phase
              for_each_phase: true
              parameters: {bits: 8}
            - notebook: 20_summary
    """)
    return tmp_path


def test_plan_expands_phases_in_order(project):
    plan = plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks",
                    renders_dir=project / "renders")
    assert [r.name for r in plan.reports] == ["00_architecture", "10_phase-1b", "10_phase-2a", "20_summary"]
    assert plan.selected == [r.name for r in plan.reports]
    assert plan.run_name == "default"
    assert plan.run_dir == (project / "renders" / "default").resolve()
    p1b = plan.reports[1]
    assert p1b.notebook == "10_phase" and p1b.phase == "1b"
    assert p1b.notebook_path == (project / "notebooks" / "10_phase.ipynb").resolve()


def test_parameter_precedence_and_injected_keys(project):
    plan = plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks",
                    renders_dir=project / "renders", overrides={"checkpoint": "/ckpt", "bits": 3},
                    show_progress=True)
    arch, p1b, p2a, summary = (r.parameters for r in plan.reports)
    # shared < phase < entry parameters < overrides
    assert arch["preset"] == "s2-pro" and summary["preset"] == "demo"
    assert p1b["scale_dtype"] == "float32" and p2a["scale_dtype"] == "float16"
    assert p1b["phase"] == "1b" and p1b["group_size"] == 128 and p2a["description"] == "two-bit"
    assert "phase" not in arch and "group_size" not in summary
    assert all(p["checkpoint"] == "/ckpt" and p["bits"] == 3 for p in (arch, p1b, p2a, summary))
    assert "run" not in arch
    # runner-injected keys
    for r in plan.reports:
        p = r.parameters
        assert p["report_name"] == r.name
        assert p["output_dir"] == str((project / "renders" / "default").resolve())
        assert p["params_dir"] == str((project / "params").resolve())
        assert Path(p["output_dir"]).is_absolute() and Path(p["params_dir"]).is_absolute()
        assert p["show_progress"] is True
        json.dumps(p)   # plain types only


def test_entry_parameters_beat_phase_keys(project):
    plan = plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks",
                    renders_dir=project / "renders")
    assert {r.name: r.parameters["bits"] for r in plan.reports} == {
        "00_architecture": 16, "10_phase-1b": 8, "10_phase-2a": 8, "20_summary": 16}


def test_run_name_and_only(project):
    plan = plan_run(project / "params" / "default.yaml", run_name="exp1", notebooks_dir=project / "notebooks",
                    renders_dir=project / "renders", only=["10_phase", "20_summary"])
    assert plan.run_name == "exp1" and plan.run_dir.name == "exp1"
    assert plan.selected == ["10_phase-1b", "10_phase-2a", "20_summary"]
    plan = plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks",
                    renders_dir=project / "renders", only=["10_phase-2a"])
    assert plan.selected == ["10_phase-2a"]
    assert plan.reports[0].parameters["report_name"] == "00_architecture"


@pytest.mark.parametrize("text, match", [
    ("run: {name: x, notebooks: [nope]}\n", "unknown notebook 'nope'"),
    ("a: [1, 2\nrun: {}\n", "invalid YAML"),
    ("preset: demo\n", "no 'run:' key"),
    ("output_dir: /x\nrun: {notebooks: [00_architecture]}\n", "'output_dir' is set by the runner"),
    ("when: 2024-01-01\nrun: {notebooks: [00_architecture]}\n", "not a plain YAML type"),
    ("run: {notebooks: []}\n", "non-empty list"),
    ("run: {notebooks: [{notebook: 00_architecture, bogus: 1}]}\n", "unknown key"),
    ("run: {notebooks: [00_architecture, 00_architecture]}\n", "appears twice"),
    ("run: {name: ../up, notebooks: [00_architecture]}\n", "run name"),
    ("- just\n- a list\n", "top level must be a mapping"),
])
def test_plan_user_errors(project, text, match):
    f = write(project / "params" / "bad.yaml", text)
    with pytest.raises(RunnerError, match=re.escape(match)):
        plan_run(f, notebooks_dir=project / "notebooks", renders_dir=project / "renders")


def test_plan_errors_missing_file_unknown_only_duplicate_phase(project):
    with pytest.raises(RunnerError, match="params file not found"):
        plan_run(project / "params" / "missing.yaml", notebooks_dir=project / "notebooks")
    with pytest.raises(RunnerError, match="unknown report 'zz'"):
        plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks", only=["zz"])
    with pytest.raises(RunnerError, match="phase file"):
        plan_run(project / "params" / "1b.yaml", notebooks_dir=project / "notebooks")
    write(project / "params" / "1b_copy.yaml", 'phase: "1b"\nmethod: int\nbits: 4\ntarget: all\n')
    with pytest.raises(RunnerError, match="defined twice"):
        plan_run(project / "params" / "default.yaml", notebooks_dir=project / "notebooks")


def test_for_each_phase_without_phase_files(tmp_path):
    write_notebook(tmp_path / "notebooks" / "10_phase.ipynb", "pass")
    f = write(tmp_path / "params" / "run.yaml", "run: {notebooks: [{notebook: 10_phase, for_each_phase: true}]}\n")
    with pytest.raises(RunnerError, match="no phase files"):
        plan_run(f, notebooks_dir=tmp_path / "notebooks")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_user_errors_exit_2(project, capsys):
    nbdir = str(project / "notebooks")
    assert cli.main(["run", "--params", str(project / "params" / "missing.yaml"), "--notebooks-dir", nbdir]) == 2
    assert "params file not found" in _one_line_error(capsys)

    unk = write(project / "other" / "unk.yaml", "run: {notebooks: [nope]}\n")
    assert cli.main(["run", "--params", str(unk), "--notebooks-dir", nbdir]) == 2
    assert "unknown notebook 'nope'" in _one_line_error(capsys)

    bad = write(project / "other" / "bad.yaml", "run: {notebooks: [\n")
    assert cli.main(["run", "--params", str(bad), "--notebooks-dir", nbdir]) == 2
    assert "invalid YAML" in _one_line_error(capsys)

    assert cli.main(["run", "--params", str(project / "params" / "default.yaml"), "--notebooks-dir", nbdir,
                     "--only", "nope"]) == 2
    assert "unknown report 'nope'" in _one_line_error(capsys)

    assert cli.main(["run", "--params", str(project / "params" / "default.yaml"), "--notebooks-dir", nbdir,
                     "--checkpoint", str(project / "no-such-ckpt")]) == 2
    assert "checkpoint not found" in _one_line_error(capsys)

    # a broken YAML beside the run file breaks phase discovery (it might be a phase file): named, exit 2
    write(project / "params" / "broken.yaml", "phase: [\n")
    assert cli.main(["run", "--params", str(project / "params" / "default.yaml"), "--notebooks-dir", nbdir]) == 2
    line = _one_line_error(capsys)
    assert "broken.yaml: invalid YAML" in line and "looking for phase files" in line
    assert not (project / "renders").exists()


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--timeout", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_registry_shape():
    assert "run" in cli.COMMANDS
    add_arguments, handler = cli.COMMANDS["run"]
    assert callable(add_arguments) and callable(handler)


def test_cli_subprocess_missing_params(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fishlab.cli", "run", "--params", "nope.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fishlab: error: params file not found: nope.yaml"


# ----------------------------------------------------------------------------------------------------
# clean notebooks
# ----------------------------------------------------------------------------------------------------

def test_strip_outputs_and_check_clean(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "print(1)")
    assert check_notebook_clean(path) == []
    assert strip_outputs(path) is False

    nb = nbformat.read(str(path), as_version=4)
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[-1].execution_count = 3
    nb.cells[-1].metadata["papermill"] = {"status": "completed"}
    inj = nbformat.v4.new_code_cell("seed = 1")
    inj.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(2, inj)
    nb.metadata["papermill"] = {"parameters": {}}
    nbformat.write(nb, str(path))
    problems = check_notebook_clean(path)
    assert any("has outputs" in p for p in problems)
    assert any("execution_count" in p for p in problems)
    assert any("injected-parameters" in p for p in problems)
    assert any("notebook metadata" in p for p in problems)

    assert strip_outputs(path) is True
    assert check_notebook_clean(path) == []
    nb = nbformat.read(str(path), as_version=4)
    assert [c.source for c in nb.cells][-1] == "print(1)" and len(nb.cells) == 3

    noparams = write_notebook(tmp_path / "noparams.ipynb", "pass", params=None)
    assert any("no cell tagged 'parameters'" in p for p in check_notebook_clean(noparams))


def test_tqdm_kwargs(tmp_path, monkeypatch):
    monkeypatch.delenv(runner.PROGRESS_TTY_ENV, raising=False)
    assert runner.tqdm_kwargs(False) == {"disable": True}
    assert runner.tqdm_kwargs(True) == {}
    monkeypatch.setenv(runner.PROGRESS_TTY_ENV, str(tmp_path / "fake-tty"))
    kw = runner.tqdm_kwargs(True)
    kw["file"].write("bar")
    kw["file"].close()
    assert (tmp_path / "fake-tty").read_text() == "bar"


# ----------------------------------------------------------------------------------------------------
# integration: real kernels
# ----------------------------------------------------------------------------------------------------

OK_CELLS = [
    """
    import json, os
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [1, 4, 9])
    plt.show()
    """,
    """
    # what the index said while this report ran, plus the parameters the runner injected
    status = json.load(open(os.path.join(output_dir, "run.json")))
    mine = [r["status"] for r in status["reports"] if r["name"] == report_name]
    json.dump({"seed": seed, "run_status": status["status"], "my_status": mine, "cwd": os.getcwd(),
               "show_progress": show_progress, "params_dir": params_dir},
              open(os.path.join(output_dir, report_name + ".metrics.json"), "w"))
    json.dump({"written_by": report_name}, open(os.path.join(output_dir, "all_results.json"), "w"))
    print("done")
    """,
]


@pytest.mark.slow
def test_run_integration(tmp_path, capsys):
    import matplotlib.pyplot  # noqa: F401  - builds matplotlib's font cache outside the timed kernels

    nbdir = tmp_path / "notebooks"
    write_notebook(nbdir / "ok.ipynb", *OK_CELLS)
    write_notebook(nbdir / "raises.ipynb", "print('before')", "raise ValueError('boom from the notebook')",
                   "print('never')")
    write_notebook(nbdir / "dies.ipynb", "print('before')", "import os\nos._exit(1)", "print('never')")
    write_notebook(nbdir / "sleeps.ipynb", "print('before')", "import time\ntime.sleep(60)", "print('never')")
    params = write(tmp_path / "params" / "run.yaml", """
        checkpoint: null
        seed: 7
        run:
          name: itest
          notebooks:
            - notebook: ok
            - notebook: raises
            - notebook: dies
            - notebook: sleeps
    """)
    renders = tmp_path / "renders"
    res = runner.run(params, notebooks_dir=nbdir, renders_dir=renders, timeout=5, show_progress=False)
    run_dir = renders / "itest"
    assert res.run_dir == run_dir.resolve()
    assert res.ok is False

    expected = {"ok": "ok", "raises": "failed", "dies": "dead kernel", "sleeps": "timeout"}
    assert {r.name: r.status for r in res.reports} == expected
    data = json.loads((run_dir / "run.json").read_text())
    assert {r["name"]: r["status"] for r in data["reports"]} == expected
    assert data["status"] == "failed" and data["ok"] is False

    index = (run_dir / "index.html").read_text()
    assert "badge s-running" not in index and 'http-equiv="refresh"' not in index
    for name, status in expected.items():
        assert re.search(rf'<tr id="{name}">.*?>{re.escape(status)}</span>', index), name
        assert f'href="{name}.html"' in index and f'href="{name}.ipynb"' in index
        assert (run_dir / f"{name}.html").is_file() and (run_dir / f"{name}.ipynb").is_file()
    assert "boom from the notebook" in index
    assert not EXTERNAL_URL.search(index)
    assert not list(run_dir.glob(".*"))          # no temp / partial files left behind

    # progress lines on stderr
    err = capsys.readouterr().err
    assert re.search(r"\[1/4\] ok ok \(\d+\.\d s\)", err)
    assert "[3/4] dies dead kernel" in err and "[4/4] sleeps timeout" in err

    # ok report: figure embedded, no external scripts, code hidden, side files listed
    ok_html = (run_dir / "ok.html").read_text()
    assert "<title>ok</title>" in ok_html
    assert re.search(r'<img [^>]*src="data:image/png;base64,', ok_html)
    assert not EXTERNAL_URL.search(ok_html)
    assert "widget-state" not in ok_html and "require.js" not in ok_html.lower()
    assert "subplots" not in ok_html and "done" in ok_html
    ok = res.report("ok")
    assert [f["name"] for f in ok.side_files] == ["all_results.json", "ok.metrics.json"]
    assert not any(f["stale"] for f in ok.side_files)
    assert 'href="ok.metrics.json"' in index and 'href="all_results.json"' in index
    metrics = json.loads((run_dir / "ok.metrics.json").read_text())
    assert metrics["seed"] == 7
    assert metrics["run_status"] == "running" and metrics["my_status"] == ["running"]   # index never claims success early
    assert metrics["cwd"] == str(tmp_path.resolve())                                     # kernel cwd = project root
    assert metrics["show_progress"] is False and metrics["params_dir"] == str(params.parent.resolve())
    nb_ok = nbformat.read(str(run_dir / "ok.ipynb"), as_version=4)
    assert nb_ok.metadata["fishlab"]["status"] == "ok"

    # the three failures: marked notebooks (metadata + top markdown cell) and rendered HTML
    for name, status in [("raises", "failed"), ("dies", "dead kernel"), ("sleeps", "timeout")]:
        nb = nbformat.read(str(run_dir / f"{name}.ipynb"), as_version=4)
        assert nb.metadata["fishlab"]["status"] == status, name
        assert nb.metadata["papermill"]["exception"] is True, name
        assert nb.cells[0].cell_type == "markdown", name
        html = (run_dir / f"{name}.html").read_text()
        assert not EXTERNAL_URL.search(html), name
        r = res.report(name)
        assert r.reason and r.reason["cell_index"] is not None
        culprit = nb.cells[r.reason["cell_index"]]
        assert culprit.metadata["papermill"]["status"] == "failed", name
        assert nb.cells[-1].metadata["papermill"]["status"] == "pending", name   # 'never' did not run
        assert "never" not in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))

    assert res.report("raises").reason["type"] == "ValueError"
    for name, word, code in [("dies", "kernel died", "os._exit(1)"), ("sleeps", "timed out", "time.sleep(60)")]:
        nb = nbformat.read(str(run_dir / f"{name}.ipynb"), as_version=4)
        top = nb.cells[0]
        assert runner.MARKER_TAG in top.metadata["tags"]
        assert word in top.source.lower()
        idx = res.report(name).reason["cell_index"]
        anchor = nb.cells[idx - 1]       # the anchor cell right before the culprit quotes its code
        assert runner.MARKER_TAG in anchor.metadata["tags"] and code in anchor.source
        assert nb.cells[idx].source.endswith(code)
        html = (run_dir / f"{name}.html").read_text()
        assert word in html.lower() and 'id="fishlab-error-cell"' in html and code in html
    assert "exit status 1" in res.report("dies").reason["message"]
    assert "5 s" in res.report("sleeps").reason["message"]

    # re-run only the ok report with code shown: the others are carried over from the previous run;
    # a side file this run does not rewrite is listed as stale
    old = run_dir / "ok.leftover.json"
    old.write_text("{}")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    res2 = runner.run(params, notebooks_dir=nbdir, renders_dir=renders, show_code=True, only=["ok"])
    assert res2.ok is True and res2.executed == ["ok"]
    assert {r.name: (r.status, r.previous) for r in res2.reports} == {
        "ok": ("ok", False), "raises": ("failed", True), "dies": ("dead kernel", True),
        "sleeps": ("timeout", True)}
    shown = (run_dir / "ok.html").read_text()
    assert "subplots" in shown and "time.sleep" not in shown and not EXTERNAL_URL.search(shown)
    index2 = (run_dir / "index.html").read_text()
    assert "from an earlier run" in index2
    assert {f["name"]: f["stale"] for f in res2.report("ok").side_files} == {
        "all_results.json": False, "ok.leftover.json": True, "ok.metrics.json": False}
    assert "stale" in index2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_cli_sigterm_marks_run_interrupted(tmp_path):
    nbdir = tmp_path / "notebooks"
    write_notebook(nbdir / "sleeps.ipynb", "import time\ntime.sleep(60)")
    write_notebook(nbdir / "after.ipynb", "pass")
    write(tmp_path / "params" / "run.yaml", "run: {name: term, notebooks: [sleeps, after]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "fishlab.cli", "run", "--params", "params/run.yaml"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "renders" / "term" / "run.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:       # wait until the sleeping cell runs
        if (tmp_path / "renders" / "term" / ".sleeps.partial.ipynb").exists():
            nb = json.loads((tmp_path / "renders" / "term" / ".sleeps.partial.ipynb").read_text() or "{}")
            if any(c.get("metadata", {}).get("papermill", {}).get("status") == "running"
                   for c in nb.get("cells", [])):
                break
        time.sleep(0.2)
    data = json.loads(status.read_text())
    assert data["status"] == "running" and data["ok"] is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    data = json.loads(status.read_text())
    assert data["status"] == "interrupted"
    assert [(r["name"], r["status"]) for r in data["reports"]] == [("sleeps", "interrupted"), ("after", "not run")]
    assert "badge s-ok" not in (tmp_path / "renders" / "term" / "index.html").read_text()
