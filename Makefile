# Two commands do all set-up: `make run` (the main job) and `make test` (the test suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_HOME := $(CURDIR)/.flwr_home

.PHONY: setup run test lint clean

$(BIN)/fedrank: pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a looser request pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(BIN)/fedrank

setup: $(BIN)/fedrank

run: setup
	$(BIN)/fedrank simulate regional-5 --epsilon 1 --run-dir runs/regional-5-eps1
	$(BIN)/fedrank audit runs/regional-5-eps1

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/mypy server client shared_model privacy simulations fedrank

clean:
	rm -rf runs .flwr_home
