# Tandem's two set-up commands: `make run` and `make test` (see README.md).
# Everything installs into .venv from pyproject.toml; nothing is installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench train-pair

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Until the web platform lands (issue 3), `make run` streams one speculative
# completion from the shipped demo pair in the terminal.
run: $(STAMP)
	$(PY) -m speculative.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check speculative tests
	$(VENV)/bin/ruff format --check speculative tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m speculative.bench

train-pair: $(STAMP)
	$(PY) -m speculative.train_pair
