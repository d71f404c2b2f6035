# The two commands: `make repro` (the pipeline) and `make test` (the tests).
# Both create .venv with the pinned dependencies first, once.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# stages call `python` and `dvc` from PATH: make it the project's environment
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help venv repro test lint bench mutation clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || python3.11 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/.installed  ## create .venv with the pinned dependencies (idempotent)

# params.yaml first, composed from conf/ as `dvc exp run` does (python -m mnist_gan compose refuses to
# overwrite an uncommitted edit of params.yaml); then the stages whose deps or params changed
repro: venv  ## compose params.yaml from conf/, then run the pipeline (dvc repro)
	python -m mnist_gan compose
	dvc repro

test: venv  ## run the unit and end-to-end tests
	pytest

lint: venv  ## ruff
	ruff check src stages tests benchmarks

# one thread per mutant worker: the tests' tensors are tiny, and two workers x two threads thrash 2 cores
MUTANTS ?=  # all of the core; or mutmut's name patterns, e.g. MUTANTS='mnist_gan.losses.*'
mutation: venv  ## mutation testing of the core with the fast tests (mutmut): score per module, survivors
	OMP_NUM_THREADS=1 mutmut run --max-children $$(nproc) $(MUTANTS)
	python tests/mutation_report.py $(MUTANTS)

bench: venv  ## every preset's training loop against a plain eager loop of its nets (and the MLP's against the tutorial's), with its FLOP floor
	python benchmarks/bench.py

# --- Experiments at team scale (docs/team.md) ---
SWEEP ?= lr=0.0001,0.0002,0.0004
JOBS ?= 2
REV ?= main
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000

.PHONY: sweep metrics-diff mlflow-server

# each worker gets cores / JOBS threads: parallel jobs with a thread per core each thrash the CPU
SWEEP_THREADS ?= $(shell n=$$(( $$(nproc) / $(JOBS) )); echo $$(( n > 0 ? n : 1 )))

# DVC's Hydra sweep: one queued experiment per combination, each composed from conf/ with its
# values (model=mlp,cgan picks files of conf/model/); waits for the queue, then shows what differs
sweep: venv  ## queued grid, JOBS at a time: SWEEP='lr=0.0001,0.0004 seed=0,1' or SWEEP='model=mlp,cgan'
	dvc exp run --queue $(foreach s,$(SWEEP),-S '$(s)')
	OMP_NUM_THREADS=$(SWEEP_THREADS) dvc queue start -j $(JOBS)
	@echo "waiting for the queue (dvc queue logs NAME follows one experiment)"
	@while dvc queue status | grep -qwE 'Queued|Running'; do sleep 10; done
	dvc queue status
	dvc exp show --no-pager --only-changed --md --drop 'Created|Executor|mlflow_run_id|.*\.(pt|csv|json)$$'
	@echo "compare the runs: python -m mnist_gan compare [--metric fid]"

metrics-diff: venv  ## dvc metrics/params diff against git REV as Markdown; fails if ci.metric regressed
	python -m mnist_gan metrics-diff --rev $(REV)

# The team's server: PostgreSQL and `mlflow server --app-name basic-auth`, both kept in TEAM_DIR
# (cluster, artifacts, logs, pid files, secrets); docs/team.md. Debian's PostgreSQL, installed if missing.
# Optional: TEAM_ALLOWED_HOSTS (Host names clients use, when TEAM_HOST=0.0.0.0 exposes it),
# TEAM_ARTIFACTS (an object store, e.g. s3://bucket/mlflow, instead of TEAM_DIR/artifacts).
TEAM_DIR ?= $(CURDIR)/team-server
TEAM_HOST ?= 127.0.0.1
TEAM_PORT ?= 5000
TEAM_PG_PORT ?= 5433
POSTGRES_INSTALLED = ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1

.PHONY: team-server team-server-stop

team-server: venv  ## MLflow server with logins on PostgreSQL, in TEAM_DIR (team-server/), on TEAM_HOST:TEAM_PORT
	@$(POSTGRES_INSTALLED) || (apt-get update && apt-get install -y postgresql)
	python -m mnist_gan team-server start --dir '$(TEAM_DIR)' --host '$(TEAM_HOST)' --port '$(TEAM_PORT)' \
		--pg-port '$(TEAM_PG_PORT)' $(if $(TEAM_ALLOWED_HOSTS),--allowed-hosts '$(TEAM_ALLOWED_HOSTS)') \
		$(if $(TEAM_ARTIFACTS),--artifacts-destination '$(TEAM_ARTIFACTS)')

team-server-stop: venv  ## stop the team server and its PostgreSQL (TEAM_DIR)
	python -m mnist_gan team-server stop --dir '$(TEAM_DIR)'

# the server keeps everything in mlflow-server/: runs in mlflow.db, files in mlartifacts/ (both git-ignored)
mlflow-server: venv  ## MLflow tracking server on 127.0.0.1:5000, stored in mlflow-server/
	mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow-server/mlflow.db \
		--artifacts-destination $(CURDIR)/mlflow-server/mlartifacts
