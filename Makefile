# The two commands: `make repro` (the pipeline) and `make test` (the tests).
# Both create .venv with the pinned dependencies first, once.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# stages call `python` and `dvc` from PATH: make it the project's environment
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help venv repro test lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || python3.11 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/.installed  ## create .venv with the pinned dependencies (idempotent)

repro: venv  ## run the pipeline on params.yaml (dvc repro)
	dvc repro

test: venv  ## run the unit and end-to-end tests
	pytest

lint: venv  ## ruff
	ruff check src stages tests benchmarks

bench: venv  ## compare the training loop's speed with the tutorial's loop
	python benchmarks/bench.py
