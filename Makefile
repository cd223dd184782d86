# Switchboard developer commands. Everything installs itself: a Python virtual environment
# in .venv (pinned requirements) and Azurite from the committed npm lock file.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ONLY ?=
FUZZ_SECONDS ?= 120
FUZZ_TEST_SECONDS ?= 8
SANITIZE := .sanitize

.PHONY: demo start test lint typecheck pytest bench clean sanitize fuzz fuzz-short test-loaded

$(VENV)/.installed: requirements.txt requirements-dev.txt native/switchboard_speedups.c native/switchboard_sync.c native/shared.h native/setup.py
	$(PYTHON) -m venv $(VENV)
	rm -rf native/build  # objects built with other flags would be linked as they are
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

deps: $(VENV)/.installed node_modules/.installed

# The official clients the push benchmark compares against; not needed by the app or tests.
$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

demo: deps
	$(PY) -m devhost.services --fakes -- $(PY) -m demo

start: deps
	$(PY) -m devhost.services --fakes --data .azurite -- $(PY) -m devhost serve

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: deps
	$(VENV)/bin/mypy

pytest: deps
	$(VENV)/bin/pytest

test: lint typecheck pytest fuzz-short

# The suite three times in a row beside a second suite running on the same cores (the
# check that no test depends on timing or load; scripts/loaded-check.sh).
test-loaded: deps
	bash scripts/loaded-check.sh

# The C speedups under ASan/UBSan with libFuzzer coverage (clang, installed if missing).
$(SANITIZE)/.built: $(VENV)/.installed native/switchboard_speedups.c native/switchboard_sync.c native/shared.h native/setup.py native/sanitize.sh
	bash native/sanitize.sh
	touch $@

sanitize: $(SANITIZE)/.built

# Every fuzz target for FUZZ_SECONDS each; findings fail it (fuzz/__main__.py).
fuzz: sanitize
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

# The short run `make test` includes.
fuzz-short: sanitize
	$(PY) -m fuzz --seconds $(FUZZ_TEST_SECONDS)

bench: deps $(VENV)/.bench-installed
	$(PY) -m devhost.services --fakes -- $(PY) -m bench $(ONLY)

clean:
	rm -rf $(VENV) .venv313 node_modules .azurite .pytest_cache .mypy_cache .ruff_cache $(SANITIZE)
