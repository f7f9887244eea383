# Quick start:  make demo   (set up .venv, start the web app on an offline model: http://127.0.0.1:7860)
#               make test   (set up .venv and the system Chromium, lint, run the whole test suite)
# Also:         make fast-test (the fast math and engine tests only, under a minute), make lint
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first where it is available, so the range in
# requirements.txt is already satisfied and no multi-GB CUDA build is pulled in.
TORCH ?= torch==2.13.0

.PHONY: setup demo cli-demo test fast-test lint clean chromium
setup: $(VENV)/.installed

# The browser test (tests/test_browser.py) drives the system Chromium, never a downloaded one.
# Installed with apt when missing: directly as root, else through passwordless sudo; a machine where
# neither works stops here with the command to run, rather than testing without a browser.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	} || { echo "error: the browser test needs Debian's chromium; install it with: sudo apt-get install chromium" >&2; exit 1; }

# constraints.txt: the exact versions the suite last passed with (a new upstream release cannot
# change what these commands install).
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-offline.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-offline.txt
	touch $@

demo: setup
	$(PY) app.py

cli-demo: setup
	$(PY) -m clover_core demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup chromium lint
	$(PY) -m pytest -q

FAST := not slow and not real_weights and not server and not browser and not gpu
fast-test: setup
	$(PY) -m pytest -q -m "$(FAST)"

clean:
	rm -rf $(VENV)
