# make demo: play the five behaviours over real HTTP on a throw-away SQLite store.
# make test: install everything into .venv and run the whole suite (Redis at 127.0.0.1:6379 for the Redis tests);
#            the suite also builds the docs with --strict and runs the snippets of the README and getting started.
# make docs: build the documentation site into site/; make docs-serve: serve it at http://127.0.0.1:8000.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := sa_middleware adapters tests benchmarks $(wildcard examples)

.PHONY: demo test lint typecheck bench docs docs-serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sa-middleware demo --examples examples

test: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/run.py

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(PY) -m mkdocs serve --strict

clean:
	rm -rf $(VENV) .venv-django42 build site *.egg-info .pytest_cache .mypy_cache .ruff_cache
