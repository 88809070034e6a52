# Two commands matter: `make demo` and `make test`. Both set up .venv first.
PY ?= python3.11
VENV := .venv
PYBIN := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DEV_STAMP := $(VENV)/.installed-dev
WORKDIRS ?= workdirs
# Test worker processes (pytest-xdist; 0: all tests in this process). A file's tests stay
# in one worker, so its module fixtures run once. 2 for CI's 2 cores (WORKSPACE.md, Set-up).
TEST_WORKERS ?= 2
PYTEST := $(PYBIN) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-all bench lint typecheck clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q -r requirements.txt
	$(PYBIN) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PYBIN) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PYBIN) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PYBIN) -m pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

demo: setup
	$(PYBIN) -m experiments.fedgan_debug --workdir=$(WORKDIRS)/demo_fedgan_debug \
	  --flagfile=launch/demo.flags

# ruff and mypy first (~1 s and ~10 s cold, its install included): main stays lint-clean
# and type-clean.
test: lint typecheck
	$(PYTEST) tests

test-all: lint typecheck
	$(PYTEST) -m "" tests

bench: $(BENCH_STAMP)
	$(PYBIN) -m benchmarks.dp_overhead

lint: setup
	$(PYBIN) -m ruff check .

typecheck: $(DEV_STAMP)
	$(PYBIN) -m mypy

clean:
	rm -rf $(VENV) $(WORKDIRS)
