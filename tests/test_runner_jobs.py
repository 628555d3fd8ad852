"""Reports as jobs: needs and resources in the plan, the scheduler's end states, the SLURM executor's sbatch
scripts (real submitit, fake sbatch/srun/sacct on PATH), and real subprocess jobs through submitit's local
executor: a failing and a timed-out job, a runner interrupted while jobs run, `status` collecting them from
another process, and a resumed run."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from fishlab import cli
from fishlab.runner import RunnerError, plan_run, report_name_for, run, status
from fishlab.runner.classify import classify_job_end
from fishlab.runner.resources import LIGHT_RESOURCES, PHASE_RESOURCES, signal_delay_s

from test_runner import write, write_notebook


# ----------------------------------------------------------------------------------------------------
# the plan: needs, resources, executor, report names
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path):
    for nb in ("00_architecture", "10_phase", "20_layer_errors", "90_summary"):
        write_notebook(tmp_path / "notebooks" / f"{nb}.ipynb", "pass")
    write(tmp_path / "params" / "1b.yaml", 'phase: "1b"\nmethod: int\nbits: 4\ngroup_size: 128\ntarget: slow\n')
    write(tmp_path / "params" / "2a.yaml", 'phase: "2a"\nmethod: int\nbits: 4\ngroup_size: 128\ntarget: all\n')
    write(tmp_path / "params" / "run.yaml", """
        run:
          name: r
          executor: slurm
          resources: {partition: gpu, account: proj}
          notebooks:
            - 00_architecture
            - notebook: 10_phase
              for_each_phase: true
              resources: {mem_gb: 96, sbatch: {constraint: a100}}
            - notebook: 20_layer_errors
              needs: [10_phase-2a]
            - notebook: 90_summary
              needs: [10_phase, 20_layer_errors]
              resources: {timeout_min: 5, gpus_per_node: 0}
    """)
    return tmp_path


def test_plan_needs_resources_and_executor(project):
    plan = plan_run(project / "params" / "run.yaml", notebooks_dir=project / "notebooks")
    assert plan.executor == "slurm"
    r = {x.name: x for x in plan.reports}
    assert r["00_architecture"].needs == [] and r["10_phase-1b"].needs == []
    assert r["20_layer_errors"].needs == ["10_phase-2a"]
    assert r["90_summary"].needs == ["10_phase-1b", "10_phase-2a", "20_layer_errors"]
    # defaults by kind < run.resources < the entry's
    assert r["00_architecture"].resources == {**LIGHT_RESOURCES, "partition": "gpu", "account": "proj"}
    assert r["10_phase-1b"].resources == {**PHASE_RESOURCES, "partition": "gpu", "account": "proj", "mem_gb": 96,
                                          "sbatch": {"constraint": "a100"}}
    assert r["10_phase-1b"].resources["gpus_per_node"] == 1 and r["20_layer_errors"].resources["gpus_per_node"] == 0
    assert r["90_summary"].resources["timeout_min"] == 5
    assert r["10_phase-1b"].resources is not r["10_phase-2a"].resources     # one mapping per report


@pytest.mark.parametrize("entry, match", [
    ("{notebook: 20_layer_errors, needs: [nope]}", "needs 'nope'"),
    ("{notebook: 20_layer_errors, needs: [90_summary]}", "needs '90_summary'; earlier reports"),
    ("{notebook: 20_layer_errors, needs: 3}", "'needs' must be a list"),
    ("{notebook: 20_layer_errors, resources: {gpus: 1}}", "unknown resource(s) gpus"),
    ("{notebook: 20_layer_errors, resources: {mem_gb: -1}}", "resources.mem_gb must be a positive number"),
    ("{notebook: 20_layer_errors, resources: {gpus_per_node: 0.5}}", "resources.gpus_per_node must be a whole"),
    ("{notebook: 20_layer_errors, resources: {sbatch: [x]}}", "resources.sbatch must map"),
    ("{notebook: 20_layer_errors, resources: {setup: 'module load x'}}", "resources.setup must be a list"),
])
def test_plan_needs_and_resources_errors(project, entry, match):
    f = write(project / "params" / "bad.yaml", f"run: {{notebooks: [10_phase, {entry}, 90_summary]}}\n")
    with pytest.raises(RunnerError, match=re.escape(match)):
        plan_run(f, notebooks_dir=project / "notebooks")


def test_plan_unknown_executor(project):
    f = write(project / "params" / "bad.yaml", "run: {executor: pbs, notebooks: [00_architecture]}\n")
    with pytest.raises(RunnerError, match="run.executor must be one of local, slurm, submitit-local"):
        plan_run(f, notebooks_dir=project / "notebooks")


def test_for_each_phase_may_list_the_phases(project):
    run_file = project / "params" / "some.yaml"
    write(run_file, "run:\n  name: r\n  notebooks:\n    - {notebook: 10_phase, for_each_phase: [2a, 1b]}\n")
    assert [x.name for x in plan_run(run_file, notebooks_dir=project / "notebooks").reports] == \
        ["10_phase-2a", "10_phase-1b"]
    write(run_file, "run:\n  name: r\n  notebooks:\n    - {notebook: 10_phase, for_each_phase: [1b, zz]}\n")
    with pytest.raises(RunnerError, match="unknown phase.*zz"):
        plan_run(run_file, notebooks_dir=project / "notebooks")


def test_report_name_for():
    assert report_name_for("10_phase", "2c") == "10_phase-2c"
    assert report_name_for("90_summary") == "90_summary"
    assert report_name_for("10_phase", "2c", "mine") == "mine"      # given wins (the runner always gives it)
    assert report_name_for("10_phase", "2c", None) == "10_phase-2c"


def test_repo_run_files_plan(repo):
    for name in ("default", "s2pro", "s2pro-slurm"):
        plan = plan_run(repo / "params" / f"{name}.yaml", notebooks_dir=repo / "notebooks")
        r = {x.name: x for x in plan.reports}
        phases = [n for n in r if n.startswith("10_phase-")]
        # the default run's phase reports are the plan's seven; the real-weight runs cover every phase file
        assert len(phases) == 7 if name == "default" else len(phases) >= 9
        for light in ("20_layer_errors", "30_listen", "90_summary"):
            assert set(phases) <= set(r[light].needs), (name, light)
            assert r[light].resources["gpus_per_node"] == 0
        assert "15_trained_model" in r["90_summary"].needs and r["15_trained_model"].resources["gpus_per_node"] == 0
        assert all(r[p].resources["gpus_per_node"] == 1 for p in phases)
    assert plan.executor == "slurm"


@pytest.mark.parametrize("state, status, words", [
    ("TIMEOUT", "timeout", "time limit of 30 min"),
    ("CANCELLED by 1234", "cancelled", "cancelled (CANCELLED by 1234)"),
    ("PREEMPTED", "preempted", "preempted"),
    ("OUT_OF_MEMORY", "dead kernel", "out of memory"),
    ("NODE_FAIL", "failed", "node failed"),
    ("FINISHED", "failed", "without a result"),
])
def test_classify_job_end(state, status, words):
    st, reason = classify_job_end(state, "line 1\nKilled\n", 30)
    assert st == status and words in reason["message"] and reason["tail"].endswith("Killed")


def test_signal_delay():
    assert signal_delay_s(240) == 90 and signal_delay_s(1) == 15 and signal_delay_s(0.1) == 5


# ----------------------------------------------------------------------------------------------------
# SLURM: real submitit, fake commands
# ----------------------------------------------------------------------------------------------------

FAKE_SBATCH = """
import json, os, sys
d = os.environ["FAKE_SLURM"]
n = int(open(os.path.join(d, "next_id")).read())
open(os.path.join(d, "next_id"), "w").write(str(n + 1))
with open(os.path.join(d, "sbatch.log"), "a") as f:
    f.write(json.dumps({"id": n, "argv": sys.argv[1:]}) + "\\n")
print(f"Submitted batch job {n}")
"""
FAKE_SACCT = """
import json, os, sys
d = os.environ["FAKE_SLURM"]
states = json.load(open(os.path.join(d, "states.json")))
calls = json.load(open(os.path.join(d, "calls.json"))) if os.path.exists(os.path.join(d, "calls.json")) else {}
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for j in ids:
    seq = states.get(j, ["PENDING"])
    k = calls.get(j, 0)
    calls[j] = k + 1
    print(f"{j}|{seq[min(k, len(seq) - 1)]}|node1")
json.dump(calls, open(os.path.join(d, "calls.json"), "w"))
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    import submitit

    d = tmp_path / "fake-slurm"
    d.mkdir()
    base = 40_000 + os.getpid() % 10_000 * 3 + int(time.time()) % 997 * 1000   # fresh ids: submitit caches states
    (d / "next_id").write_text(str(base))
    (d / "states.json").write_text("{}")
    for name, body in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "import sys; sys.exit(0)")):
        p = d / name
        p.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_SLURM", str(d))
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    submitit.SlurmJob.watcher.clear()
    return d, base


def test_slurm_sbatch_scripts_dependencies_and_end_states(tmp_path, fake_slurm):
    d, base = fake_slurm
    nbdir = tmp_path / "notebooks"
    for nb in ("heavy", "light", "gather"):
        write_notebook(nbdir / f"{nb}.ipynb", "print(1)", "print(2)")
    params = write(tmp_path / "params" / "run.yaml", """
        run:
          name: cluster
          executor: slurm
          resources: {partition: gpu, account: proj, setup: ["module load cuda/12.4"]}
          notebooks:
            - notebook: heavy
              resources: {gpus_per_node: 1, cpus_per_task: 8, mem_gb: 64, timeout_min: 240, sbatch: {qos: high}}
            - light
            - notebook: gather
              needs: [heavy, light]
              resources: {mem_gb: 7.5, timeout_min: 0.5}
    """)
    renders = tmp_path / "renders"
    lines = []

    def echo(line):      # the runner is stopped once all three are queued: their jobs live on
        lines.append(line)
        if line.startswith("gather: submitted"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(params, notebooks_dir=nbdir, renders_dir=renders, echo=echo, poll_s=0)
    run_dir = renders / "cluster"
    ids = {"heavy": str(base), "light": str(base + 1), "gather": str(base + 2)}
    assert lines[:3] == [f"heavy: submitted slurm job {ids['heavy']}", f"light: submitted slurm job {ids['light']}",
                         f"gather: submitted slurm job {ids['gather']} after heavy, light"]
    data = json.loads((run_dir / "run.json").read_text())
    assert data["status"] == "running" and data["executor"] == "slurm"
    assert [(r["name"], r["status"], r["job"]["id"]) for r in data["reports"]] == [
        (n, "queued", ids[n]) for n in ("heavy", "light", "gather")]

    # the sbatch scripts submitit wrote, as sbatch received them
    def script(name):
        job = data["reports"][["heavy", "light", "gather"].index(name)]["job"]
        return (run_dir / job["sbatch"]).read_text()
    heavy, light, gather = script("heavy"), script("light"), script("gather")
    for flag in ("--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=240", "--partition=gpu",
                 "--account=proj", "--qos=high", "--signal=USR2@90", "--job-name=fishlab-cluster-heavy"):
        assert f"#SBATCH {flag}\n" in heavy, flag
    assert "module load cuda/12.4" in heavy and "-m submitit.core._submit" in heavy and sys.executable in heavy
    assert "gpus-per-node" not in light and "#SBATCH --mem=32GB\n" in light and "#SBATCH --time=60\n" in light
    assert "dependency" not in heavy + light
    assert f"#SBATCH --dependency=afterany:{ids['heavy']}:{ids['light']}\n" in gather
    assert "#SBATCH --mem=7680MB\n" in gather and "#SBATCH --time=1\n" in gather   # whole minutes, rounded up
    assert f"#SBATCH --output={run_dir.resolve() / 'jobs' / 'heavy'}/%j_0_log.out\n" in heavy
    assert len((d / "sbatch.log").read_text().splitlines()) == 3

    # papermill had saved heavy's notebook up to its second cell when SLURM ended the jobs (no result)
    part = nbformat.read(str(nbdir / "heavy.ipynb"), as_version=4)
    part.cells[2].metadata["papermill"] = {"start_time": "t", "status": "completed"}
    part.cells[3].metadata["papermill"] = {"start_time": "t", "status": "running"}
    nbformat.write(part, str(run_dir / ".heavy.partial.ipynb"))
    (d / "states.json").write_text(json.dumps({ids["heavy"]: ["RUNNING", "TIMEOUT"],
                                               ids["light"]: ["CANCELLED by 0"],
                                               ids["gather"]: ["OUT_OF_MEMORY"]}))
    (run_dir / data["reports"][1]["job"]["stderr"]).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / data["reports"][1]["job"]["stderr"]).write_text("slurmstepd: error: *** JOB CANCELLED ***\n")
    seen = []
    res = status(run_dir, wait=True, poll_s=0, echo=seen.append)       # from "another shell": run.json only
    assert {r.name: r.status for r in res.reports} == {"heavy": "timeout", "light": "cancelled",
                                                       "gather": "dead kernel"}
    assert res.status == "failed" and not res.ok
    assert "heavy: running (slurm job" in "\n".join(seen)
    light_r = res.report("light")
    assert "cancelled" in light_r.reason["message"] and "JOB CANCELLED" in light_r.reason["tail"]
    assert "240 min" in res.report("heavy").reason["message"]
    nb = nbformat.read(str(run_dir / "heavy.ipynb"), as_version=4)
    assert nb.metadata["fishlab"]["status"] == "timeout" and nb.metadata["fishlab"]["job"] == ids["heavy"]
    culprit = nb.cells[res.report("heavy").reason["cell_index"]]
    assert culprit.source == "print(2)" and culprit.metadata["papermill"]["status"] == "failed"
    assert not (run_dir / ".heavy.partial.ipynb").exists()
    index = (run_dir / "index.html").read_text()
    for name in ids:
        job = res.report(name).job
        assert f'slurm job {ids[name]}' in index and f'href="{job["stdout"]}"' in index
        assert (run_dir / f"{name}.html").is_file()
    assert "badge s-cancelled" in index and "badge s-dead-kernel" in index and "executor slurm" in index

    # re-running resumes: nothing was ok, so all three are resubmitted (gather after the two new ids)
    (d / "states.json").write_text(json.dumps({str(base + k): ["CANCELLED by 0"] for k in (3, 4, 5)}))
    res2 = run(params, notebooks_dir=nbdir, renders_dir=renders, echo=None, poll_s=0)
    assert [r.job["id"] for r in res2.reports] == [str(base + k) for k in (3, 4, 5)]
    last = json.loads((d / "sbatch.log").read_text().splitlines()[-1])
    assert last["id"] == base + 5
    job = res2.report("gather").job
    assert f"afterany:{base + 3}:{base + 4}" in (run_dir / job["sbatch"]).read_text()


def test_slurm_needs_slurm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))           # no srun
    write_notebook(tmp_path / "notebooks" / "a.ipynb", "pass")
    f = write(tmp_path / "params" / "run.yaml", "run: {notebooks: [a]}\n")
    assert cli.main(["run", "--params", str(f), "--notebooks-dir", str(tmp_path / "notebooks"),
                     "--executor", "slurm"]) == 2
    assert "no SLURM on this machine" in capsys.readouterr().err
    assert not (tmp_path / "renders").exists()
    assert cli.main(["status", "nope", "--renders-dir", str(tmp_path / "renders")]) == 2
    assert "no run at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# real jobs: submitit's local executor
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_jobs_interrupt_status_and_resume(tmp_path):
    import matplotlib.pyplot  # noqa: F401  - font cache outside the timed jobs

    nbdir = tmp_path / "notebooks"
    write_notebook(nbdir / "ok.ipynb", "import json, os\njson.dump({'seed': seed}, open(os.path.join("
                   "output_dir, report_name + '.metrics.json'), 'w'))")
    write_notebook(nbdir / "raises.ipynb", "raise ValueError('boom in a job')")
    write_notebook(nbdir / "sleeps.ipynb", "print('before')", "import time\ntime.sleep(120)", "print('never')")
    write_notebook(nbdir / "gather.ipynb", "import json, os\nprint('seed from ok:', json.load(open(os.path.join("
                   "output_dir, 'ok.metrics.json')))['seed'])")
    params = write(tmp_path / "params" / "run.yaml", """
        seed: 3
        run:
          name: jobs
          resources: {timeout_min: 2}
          notebooks:
            - ok
            - raises
            - notebook: sleeps
              resources: {timeout_min: 0.4}
            - notebook: gather
              needs: [ok, sleeps]
    """)
    run_dir = tmp_path / "renders" / "jobs"
    proc = subprocess.Popen([sys.executable, "-m", "fishlab.cli", "run", "--params", "params/run.yaml",
                             "--executor", "submitit-local"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    data = {}
    while time.monotonic() < deadline:      # until ok and raises have ended and sleeps runs
        try:
            data = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            data = {}
        st = {r["name"]: r["status"] for r in data.get("reports", [])}
        if st.get("ok") == "ok" and st.get("raises") == "failed" and st.get("sleeps") == "running":
            break
        time.sleep(0.2)
    assert st == {"ok": "ok", "raises": "failed", "sleeps": "running", "gather": "queued"}, st
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "submitted jobs keep running" in err
    data = json.loads((run_dir / "run.json").read_text())
    assert data["status"] == "running"
    assert {r["name"]: r["status"] for r in data["reports"]}["gather"] == "not run"   # was held back: never submitted

    # another process collects what the jobs left: the job that ran past its time limit saved its own report
    res = status("jobs", tmp_path / "renders", wait=True, poll_s=0.2, echo=None)
    assert {r.name: r.status for r in res.reports} == {"ok": "ok", "raises": "failed", "sleeps": "timeout",
                                                       "gather": "not run"}
    assert res.status == "failed"
    sl = res.report("sleeps")
    assert "time limit" in sl.reason["message"]
    nb = nbformat.read(str(run_dir / "sleeps.ipynb"), as_version=4)
    assert nb.cells[sl.reason["cell_index"]].source == "import time\ntime.sleep(120)"
    assert nb.cells[-1].metadata["papermill"]["status"] == "pending"
    assert res.report("raises").reason["type"] == "ValueError"
    for r in res.reports[:3]:
        assert (run_dir / r.job["stdout"]).is_file() and (run_dir / r.job["stderr"]).is_file()
        assert (run_dir / f"{r.name}.html").is_file()
    index = (run_dir / "index.html").read_text()
    assert f'href="{res.report("ok").job["stderr"]}"' in index and "boom in a job" in index

    # fix the two notebooks and run again: ok is kept, the rest runs, gather after what it needs
    write_notebook(nbdir / "raises.ipynb", "print('fixed')")
    write_notebook(nbdir / "sleeps.ipynb", "print('quick now')")
    ok_job = res.report("ok").job["id"]
    lines = []
    res2 = run(params, notebooks_dir=nbdir, renders_dir=tmp_path / "renders", executor="submitit-local",
               echo=lines.append)
    assert res2.ok, [(r.name, r.status, r.reason) for r in res2.reports]
    assert res2.executed == ["raises", "sleeps", "gather"]
    assert res2.report("ok").previous and res2.report("ok").job["id"] == ok_job
    assert "kept from the previous run (ok, same parameters): ok" in lines
    ended = [ln.split()[1] for ln in lines if ln.startswith("[")]
    assert ended.index("gather") > ended.index("sleeps")
    assert "seed from ok: 3" in (run_dir / "gather.html").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"
    # a run that is complete: status says so without asking anyone, exit status 0
    assert cli.main(["status", str(run_dir)]) == 0
