# skinsweep — the two commands: `make demo` and `make test`. Both create .venv if missing and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.skinsweep-installed
LOOPBACK := sh scripts/loopback.sh
# Everything the demo writes stays under results/ (the cache too).
DEMO_ENV := SKINSWEEP_CACHE=$(CURDIR)/results/.cache

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(DEMO_ENV) $(LOOPBACK) $(PY) -m skinsweep.demo

test: install
	$(LOOPBACK) $(PY) -m pytest -q

test-fast: install
	$(LOOPBACK) $(PY) -m pytest -q -m "not slow"

bench: install
	$(LOOPBACK) $(PY) benchmarks/bench_data.py

clean:
	rm -rf results/demo results/demo-sweep results/demo-ensembles results/.cache .pytest_cache
