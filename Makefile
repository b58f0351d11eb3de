# Entry points that work on a fresh machine with only python3 (and pip):
#   make demo       a short real ListOps training run on this machine (CPU is fine)
#   make test       the test suite
#   make docs       the documentation site: docs/ -> site/ (MkDocs, strict, offline)
#   make gpu-check  on one NVIDIA GPU: attention tests, benchmark, a ListOps run (< 8 min)
# Each creates its virtual environment and installs what it needs first: the demo only
# lra itself (no TensorFlow), the tests the test extra, the docs the docs extra (MkDocs,
# mkdocstrings), the GPU check the gpu-check extra (jax[cuda12], pytest) into .venv-gpu.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GPU_VENV := .venv-gpu
DEMO_DIR ?= runs/listops-demo

.PHONY: demo test docs gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-docs: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[gpu-check]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) launch.py --config configs/listops.py:runlocal --workdir $(DEMO_DIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto --maxprocesses=4 tests

docs: $(VENV)/.installed-docs
	$(PY) -m mkdocs build --strict --site-dir site

gpu-check: $(GPU_VENV)/.installed
	PYTHON=$(GPU_VENV)/bin/python scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(GPU_VENV) runs site .pytest_cache
