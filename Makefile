# Two commands matter: `make demo` and `make test`. Both set up .venv first.
PY ?= python3.11
VENV := .venv
PYBIN := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
WORKDIRS ?= workdirs

.PHONY: setup demo test test-all bench lint clean

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

demo: setup
	$(PYBIN) -m experiments.fedgan_debug --workdir=$(WORKDIRS)/demo_fedgan_debug \
	  --flagfile=launch/demo.flags

test: setup
	$(PYBIN) -m pytest -q tests

test-all: setup
	$(PYBIN) -m pytest -q -m "" tests

bench: $(BENCH_STAMP)
	$(PYBIN) -m benchmarks.dp_overhead

lint: setup
	$(PYBIN) -m ruff check .

clean:
	rm -rf $(VENV) $(WORKDIRS)
