# `make run` scans examples/ through the whole stack; `make test` runs the suite, `make test-fast` its quick part.
# Each sets up .venv.

PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch. GPU machines: `make TORCH_SPEC='torch>=2.4,<3' ...` with a CUDA index configured.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= worker,embedded,test
MODTAG_MODELS ?= base
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit test-fast integration e2e bench clean setup

run: $(STAMP)
	MODTAG_MODELS=$(MODTAG_MODELS) $(BIN)/modtag scan examples/

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core policies worker api modtag

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

# The unit layer without the tests marked slow (bench reports, the heaviest parity sweeps): for every edit.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/modtag bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .modtag .pytest_cache .mypy_cache .ruff_cache
