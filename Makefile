# make serve: run the service with the shipped model.   make test: the whole suite.
# Both build .venv on first use and only reinstall when pyproject.toml or constraints.txt change.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip install -q -c constraints.txt
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve test lint bench bench-lstm model system-deps clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(PY) -m service --host $(HOST) --port $(PORT)

system-deps:
	@scripts/system-deps.sh

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check model service tests bench
	$(VENV)/bin/mypy

test: $(VENV)/.dev system-deps lint
	$(PY) -m pytest -p no:cacheprovider

bench: $(VENV)/.dev
	$(PY) -m bench

bench-lstm: $(VENV)/.dev
	$(PY) -m bench.gru_vs_lstm

model: $(VENV)/.dev
	$(PY) -m model.train --dataset seattle-temps --name seattle-temp --out model/weights/default --seed 0

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
