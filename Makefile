# Everything a fresh machine needs: `make serve` and `make test` create .venv by themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
STATE ?= $(CURDIR)/.state
LISTEN ?= 127.0.0.1:8222
PYTEST_ARGS ?=
# A compat editable install is a plain .pth path entry. The default (a meta-path finder
# imported from site at every start-up) costs `rexec run` 15-25 ms: DESIGN.md section 2a.
EDITABLE := --config-settings editable_mode=compat

.PHONY: venv serve test test-slow test-all lint bench demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' $(EDITABLE)
	touch $(STAMP)

venv: $(STAMP)

## Start the server on loopback; creates a state dir and a first token when none exists.
serve: $(STAMP)
	$(VENV)/bin/rexec serve --state-dir $(STATE) --listen $(LISTEN)

## The default suite (everything but tests marked slow); stays under five minutes on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check rexec tests scripts benchmarks
	$(VENV)/bin/ruff format --check rexec tests scripts benchmarks
	$(VENV)/bin/mypy --strict rexec

## Bytecode first: an installed rexec has it, and `rexec run` would otherwise compile its
## sources on every cold start (~15 ms) when PYTHONDONTWRITEBYTECODE is set.
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]' $(EDITABLE)
	$(PY) -m compileall -q rexec
	$(PY) -m benchmarks $(BENCH_ARGS)

demo: $(STAMP)
	$(VENV)/bin/rexec demo all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis rexec.egg-info
