# make serve: run the service with the shipped model.   make test: the whole suite.   make lock: refresh the locks.
# serve and test build .venv on first use from the locks and reinstall when a lock, pyproject.toml or
# constraints.txt changes: requirements.lock (the image's runtime set, also what `make serve` installs) and
# requirements-dev.lock (the same versions plus the test and lint tools) hold every dependency but torch at
# one version with its hashes; torch comes at constraints.txt's version from pip's configured sources.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip install -q
HOST ?= 0.0.0.0
PORT ?= 8000
# Where `make lock` finds torch's CPU wheel, whose metadata decides torch's own dependencies (the CUDA build on
# PyPI would add the nvidia-* wheels): this machine's wheel directory, else PyTorch's CPU index.
TORCH_LINKS ?= $(firstword $(wildcard /opt/wheels) https://download.pytorch.org/whl/cpu/torch/)
# Resolved for the image's platform (CPython 3.11 on glibc Linux); hashes cover every file of a version.
LOCK := $(VENV)/bin/uv pip compile pyproject.toml -c constraints.txt --find-links $(TORCH_LINKS) --upgrade \
	--generate-hashes --no-emit-package torch --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	--custom-compile-command 'make lock' --quiet

.PHONY: serve test lint lock bench bench-lstm model system-deps clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The lock first (hash-checked, nothing else fetched), then torch and the package itself; pip check proves
# the set is whole.
$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml constraints.txt requirements.lock
	$(PIP) --require-hashes --no-deps -r requirements.lock
	$(PIP) -c constraints.txt --no-build-isolation -e .
	$(VENV)/bin/pip check
	touch $@

$(VENV)/.dev: $(VENV)/bin/python pyproject.toml constraints.txt requirements-dev.lock
	$(PIP) --require-hashes --no-deps -r requirements-dev.lock
	$(PIP) -c constraints.txt --no-build-isolation -e '.[dev]'
	$(VENV)/bin/pip check
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(PY) -m service --host $(HOST) --port $(PORT)

system-deps:
	@scripts/system-deps.sh

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check model service tests bench harness
	$(VENV)/bin/mypy

# Two workers (pytest-xdist): each test starts its own servers, and much of the suite is their start-up and
# tests waiting on them, so two run side by side on two cores in well under the time of one after the other.
TEST_WORKERS ?= 2

test: $(VENV)/.dev system-deps lint
	$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS)

# The newest versions pyproject.toml's ranges allow; the dev lock keeps the runtime lock's versions.
lock: $(VENV)/.dev
	$(LOCK) --extra redis -o requirements.lock
	$(LOCK) --extra dev -c requirements.lock -o requirements-dev.lock

bench: $(VENV)/.dev
	$(PY) -m bench

bench-lstm: $(VENV)/.dev
	$(PY) -m bench.gru_vs_lstm

model: $(VENV)/.dev
	$(PY) -m model.train --dataset seattle-temps --name seattle-temp --out model/weights/default --seed 0

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
