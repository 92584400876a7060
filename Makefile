# EchoPulse: two commands from a fresh clone (only python3 needed).
#   make demo   - create .venv, install, run the whole chain on embedded defaults into demo/
#                 (the demo48 recipe, ~35 min on 2 cores, trained until its video beats with its ECG;
#                  make demo RECIPE=demo: ~12 min, does not beat; RECIPE=tiny: seconds)
#   make test   - create .venv, install with test extras, run the test suite
#
# torch: a CPU machine gets the CPU build of torch 2.13.0. A GPU user switches with one variable:
#   make demo TORCH_SPEC=torch==2.13.0          (the CUDA build from PyPI)
# Where the CPU wheel is not on a local find-links path, add its index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
RECIPE ?= demo48
WORKDIR ?= demo
PYTEST_ARGS ?=

PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: demo test install install-test lock clean bench

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" "setuptools>=68" wheel

$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml requirements.lock $(VENV)/.torch
	$(PIP) install --quiet -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements.lock $(VENV)/.torch
	$(PIP) install --quiet -c requirements.lock -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/echopulse quickstart --workdir $(WORKDIR) --recipe $(RECIPE)

test: install-test
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: install-test
	$(PY) bench/generate.py --json bench/results/generate.json

# Re-pin every dependency from the current environment (torch is pinned by TORCH_SPEC above).
lock: install-test
	{ echo "# Pinned versions of every dependency (pip freeze of a working install, torch excluded:"; \
	  echo "# the Makefile installs torch first from TORCH_SPEC). Regenerate with \`make lock\`."; \
	  $(PIP) freeze --exclude-editable | grep -vE '^(torch|echopulse)=='; } > requirements.lock

clean:
	rm -rf $(VENV) demo .pytest_cache
