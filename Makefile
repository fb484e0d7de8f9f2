# make demo: play the five behaviours over real HTTP on a throw-away SQLite store.
# make test: install everything into .venv and run the whole suite (Redis at 127.0.0.1:6379 for the Redis tests;
#            Node.js for the identity-provider tests, whose OpenID Provider is installed with npm into
#            .cache/oidc-provider); the suite also builds the docs with --strict and runs the doc snippets.
# make docs: build the documentation site into site/; make docs-serve: serve it at http://127.0.0.1:8000.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := sa_middleware adapters tests benchmarks $(wildcard examples)
IDP := .cache/oidc-provider

.PHONY: demo test lint typecheck bench bench-quick docs docs-serve clean idp

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sa-middleware demo --examples examples

$(IDP)/.installed: tests/idp/package.json tests/idp/package-lock.json
	mkdir -p $(IDP)
	cp tests/idp/package.json tests/idp/package-lock.json $(IDP)/
	cd $(IDP) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

idp: $(IDP)/.installed

test: $(STAMP) $(IDP)/.installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

typecheck: $(STAMP)
	$(PY) -m mypy

# make bench: the HTTP comparison (ASGI and WSGI, wrk) and the in-process figures, written to
# benchmarks/results.json, then the micro-benchmarks; make bench-quick: the comparison in under two minutes.
bench: $(STAMP)
	$(PY) benchmarks/compare.py --out benchmarks/results.json
	$(PY) benchmarks/run.py
	$(PY) benchmarks/metrics_cost.py

bench-quick: $(STAMP)
	$(PY) benchmarks/compare.py --quick --out benchmarks/results-quick.json

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(PY) -m mkdocs serve --strict

clean:
	rm -rf $(VENV) .venv-django42 build site *.egg-info .pytest_cache .mypy_cache .ruff_cache .cache
