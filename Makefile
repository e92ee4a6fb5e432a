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

RUN_DIR := runs/regional-5-eps1

run: setup
	rm -rf $(RUN_DIR)
	$(BIN)/fedrank simulate regional-5 --epsilon 1 --run-dir $(RUN_DIR)
	$(BIN)/fedrank audit $(RUN_DIR)
	# On-device scoring with the final signed release, verified against the server's key.
	$(BIN)/fedrank score --release $(RUN_DIR)/releases/round-0030 \
		--public-key $(RUN_DIR).keys/server-signing.pub --query "dual monitor stand" --top 5

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/mypy server client shared_model privacy simulations fedrank

clean:
	rm -rf runs .flwr_home
