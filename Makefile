# Newcomers: `make demo` shows the broker working end to end; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo run test test-fast check lint format bench clean system-deps image

# Exact pins from requirements-dev.lock (scripts/lock-requirements.sh), then the broker itself.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

system-deps:
	bash scripts/system-deps.sh

demo: $(STAMP)
	$(BIN)/broker demo

run: $(STAMP)
	$(BIN)/broker serve

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format broker tests bench
	$(BIN)/ruff check --fix broker tests bench

check: lint

# Every test, real components included, with coverage (the floor is in pyproject.toml).
test: $(STAMP) system-deps lint
	$(BIN)/pytest -q --cov=broker --cov-report=term-missing:skip-covered

# The edit-test loop (under a minute on 2 cores): every test but those marked slow or real
# (a real OpenBao, promtool, the Helm SDK, hadolint, nginx, a `broker serve` process).
# Those take as long again; `make test` runs them.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m 'not slow and not real'

# The container image, with podman (scripts/build-image.sh): on the official python base, or
# `make image BASE=debian` on a base made from Debian's packages where no registry is reachable.
image:
	bash scripts/build-image.sh

bench: $(STAMP) system-deps
	$(BIN)/python -m bench --update README.md docs/performance.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache broker-data
