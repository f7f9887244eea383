# Quick start:  make demo   (set up .venv, run the main job offline)
#               make test   (set up .venv, run the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first where it is available, so the range in
# requirements.txt is already satisfied and no multi-GB CUDA build is pulled in.
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-offline.txt
	touch $@

demo: setup
	$(PY) -m clover_core demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
