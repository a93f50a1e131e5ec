# snnbench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
SWEEP_DIR ?= outputs/multirun/make-sweep

.DEFAULT_GOAL := help

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/snnbench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/snnbench  ## create .venv (if missing) and install snnbench with its dev tools

run: install  ## run the whole pipeline on the embedded digits dataset (offline, < 1 min)
	$(BIN)/snnbench run sim.T=32 $(ARGS)

sweep: install  ## baseline vs termapping vs augmapping on digits (T=16, one ANN) into outputs/multirun/make-sweep
	rm -rf $(SWEEP_DIR)
	$(BIN)/snnbench run -m experiment=digits_methods hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)

report: install  ## tables and plots of `make sweep` (report.csv, accuracy_vs_t.png, ...) into its folder
	$(BIN)/snnbench report $(SWEEP_DIR)

bench: install  ## engine speed and memory vs reference, dense floor, SpikingJelly; MNIST CNN T=64 (docs/performance.md)
	$(BIN)/snnbench bench dataset=mnist train.epochs=1 sim.T=64 sim.batch_size=64 bench.repeats=3 $(ARGS) \
	    --out outputs/bench/mnist_cnn_T64.csv

test: install  ## run the fast test suite
	$(BIN)/pytest -q -n auto --dist worksteal

test-slow: install  ## run the slow tests too
	$(BIN)/pytest -q -m ''

test-slurm: install  ## one-node SLURM cluster here (root; installs slurm-wlm, munge): a sweep and shards via SLURM, 1-2 min
	scripts/slurm_test.sh

install-check: install  ## pip install . of a clean clone (committed tree) into a fresh venv, then `snnbench run` elsewhere (~6 min)
	$(BIN)/pytest -q -m slow tests/test_install.py

lint: install  ## ruff
	$(BIN)/ruff check snnbench tests

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs/runs outputs/multirun outputs/cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

.PHONY: help install run sweep report bench test test-slow test-slurm install-check lint clean
