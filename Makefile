# Two commands on a fresh machine: `make demo` (the built-in-world demo) and `make test` (the suite).
VENV ?= .venv
export VENV

.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lorafuse demo

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
