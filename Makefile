# Two entry points that work on a fresh machine with only python3 (and pip):
#   make demo   a short real ListOps training run on this machine (CPU is fine)
#   make test   the test suite
# Each creates .venv and installs what it needs first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/listops-demo

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) launch.py --config configs/listops.py:runlocal --workdir $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses=4 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
