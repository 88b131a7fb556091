# Two commands: `make demo` and `make test`. Both build what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo demo-packages lint typecheck pytest system-deps clean bench

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgefleet needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

system-deps:
	@bash .ci/system-deps

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) system-deps
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

.PHONY: test-arm
test-arm: $(STAMP)
	bash hardware/arm/run-tests.sh

demo: $(STAMP)
	$(PY) -m edgefleet_demo --out demo-out $(DEMO_ARGS)

demo-packages: $(STAMP)
	$(PY) -m model_packager.demo --out demo-out/packager

bench: $(STAMP) system-deps
	$(PY) bench/packager.py
	$(PY) bench/agent_overhead.py
	$(PY) bench/ingest.py
	$(PY) bench/drift.py

clean:
	rm -rf $(VENV) demo-out .mypy_cache .ruff_cache .pytest_cache
