PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench bench-scale chaos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/colonies dev

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python simulations/bench.py

bench-scale: $(STAMP)
	$(BIN)/python simulations/bench_scale.py $(ARGS)

chaos: $(STAMP)
	$(BIN)/python simulations/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) .colonies-dev
