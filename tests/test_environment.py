"""environment.yml (conda, GPU nodes) must agree with pyproject.toml, the single source of dependencies."""
import re
import tomllib

import yaml


def test_environment_yml_installs_the_package_with_existing_extras(repo):
    env = yaml.safe_load((repo / "environment.yml").read_text())
    py = tomllib.loads((repo / "pyproject.toml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    # the package itself, from pip, with its extras: nothing else is listed twice
    assert len(pip) == 1, f"environment.yml must not repeat dependencies pyproject.toml owns: {pip}"
    m = re.fullmatch(r"-e \.\[([\w,]+)\]", pip[0])
    assert m, pip[0]
    extras = set(m.group(1).split(","))
    assert extras == set(py["project"]["optional-dependencies"]), "environment.yml must install every extra"
    # conda lists only python and pip (every library comes from pyproject through pip)
    assert {d for d in deps if isinstance(d, str)} == {"python=3.11", "pip"}


def test_pyproject_keeps_torch_a_range_and_the_setup_script_pins_the_cpu_wheel(repo):
    py = tomllib.loads((repo / "pyproject.toml").read_text())
    deps = py["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert torch_req == "torch>=2.4"            # GPU users get their CUDA build
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in deps}
    assert {"safetensors", "papermill", "nbconvert", "nbformat", "ipykernel", "matplotlib", "seaborn", "pyyaml",
            "tqdm"} <= names
    assert not {"torchaudio", "scrapbook"} & names
    notebooks = {re.split(r"[<>=!~ ]", d)[0].lower() for d in py["project"]["optional-dependencies"]["notebooks"]}
    assert {"jupyterlab", "ipywidgets"} <= notebooks
    dev = (repo / "dev.py").read_text()
    assert '"FISHLAB_TORCH", "torch==2.13.0"' in dev and 'EXTRAS = "notebooks,dev"' in dev
    assert (repo / ".ci" / "run").read_text().strip().endswith("python3 dev.py test")
    readme = (repo / "README.md").read_text()
    assert "python3 dev.py workbook" in readme and "python3 dev.py test" in readme
