# `make test` is the whole check CI runs: lint, types, tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install lint bench demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

demo: install
	$(VENV)/bin/archiver demo
