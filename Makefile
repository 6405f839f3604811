# Every target installs what it needs first, so each works on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install services demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)           # first: keeps pip from pulling a CUDA build
	$(BIN)/pip install -q -e '.[dev,factory]'   # factory: klong-factory's PDF converter (AGPL, see README)
	touch $(STAMP)

install: $(STAMP)

# Docker engine, local base image, bubblewrap and a one-node Slurm (root on Debian; idempotent).
services:
	bash tools/services.sh

demo: install
	bash tools/demo.sh

# pytest exits 5 when it collects nothing: that is not a failure of the suite.
test: install services
	$(BIN)/python -m pytest -q --durations=20 $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache .ruff_cache
