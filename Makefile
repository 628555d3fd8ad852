# Two entry points, both usable on a fresh machine with only Python 3.11 and pip:
#   make workbook   create .venv (if needed) and render the default workbook into renders/
#   make test       create .venv (if needed) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel keeps CI small; GPU users install their CUDA torch first and skip this pin (TORCH_PIN=).
TORCH_PIN ?= torch==2.13.0
RUN    ?= default
PARAMS ?= params/default.yaml

.PHONY: env workbook test clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q "$(TORCH_PIN)")
	$(PY) -m pip install -q -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

workbook: env
	$(VENV)/bin/fishlab run --params $(PARAMS) --run $(RUN)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) renders/*/
