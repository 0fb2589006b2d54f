# skinsweep — the two commands: `make demo` and `make test`. Both create .venv if missing and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.skinsweep-installed
LOOPBACK := sh scripts/loopback.sh
# Everything the demo writes stays under results/ (the cache too).
DEMO_ENV := SKINSWEEP_CACHE=$(CURDIR)/results/.cache

.PHONY: install browser demo test test-fast bench bench-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(DEMO_ENV) $(LOOPBACK) $(PY) -m skinsweep.demo

# The serve page test drives a real headless chromium (Debian's package; Playwright's own download is not
# used). Installed here when missing and we are root with apt-get; otherwise that one test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  timeout 900 sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }'; } || \
	  echo "note: no chromium; the browser test of the serve page will skip"

test: install browser
	$(LOOPBACK) $(PY) -m pytest -q

test-fast: install
	$(LOOPBACK) $(PY) -m pytest -q -m "not slow"

bench: install
	$(LOOPBACK) $(PY) benchmarks/bench_data.py

bench-serve: install
	$(LOOPBACK) $(PY) benchmarks/bench_serve.py

clean:
	rm -rf results/demo results/demo-sweep results/demo-ensembles results/.cache .pytest_cache
