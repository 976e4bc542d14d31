# `make run` scans examples/ through the whole stack; `make test` runs the suite, `make test-fast` its quick part.
# Each sets up .venv.

PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch. GPU machines: `make TORCH_SPEC='torch>=2.4,<3' ...` with a CUDA index configured.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= worker,embedded,test
MODTAG_MODELS ?= base
# Every dependency but torch pinned (`make lock` regenerates it): two installs a week apart are the same.
LOCK ?= requirements.lock
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov (the Kubernetes manifests' checks, tests/unit/test_deploy.py) in a virtual environment of its own: it pins
# boto3, botocore, packaging and networkx below the lock. Only the checkov command goes on the tests' PATH.
TOOLS ?= .venv-tools
CHECKOV_SPEC ?= checkov==3.3.30
TOOLS_STAMP := $(TOOLS)/.installed
TOOLS_PATH := $(CURDIR)/$(TOOLS)/path

.PHONY: run test lint unit test-fast integration e2e bench bench-gpu clean setup lock

run: $(STAMP)
	MODTAG_MODELS=$(MODTAG_MODELS) $(BIN)/modtag scan examples/

test: $(STAMP) $(TOOLS_STAMP) lint
	PATH="$(TOOLS_PATH):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

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

# On a machine with an NVIDIA GPU: its own venv (.modtag/venv-gpu) with TORCH_SPEC from a CUDA wheel index, then
# `modtag bench --device cuda --json` (deploy/gpu/bench-gpu.sh says what it does and its exit statuses).
TORCH_INDEX_URL_GPU ?= https://download.pytorch.org/whl/cu128
bench-gpu:
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX_URL="$(TORCH_INDEX_URL_GPU)" deploy/gpu/bench-gpu.sh

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Without a package index checkov does not install: its tests skip, saying so, and the rest runs.
$(TOOLS_STAMP):
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	if $(TOOLS)/bin/python -m pip install --quiet "$(CHECKOV_SPEC)"; then \
		mkdir -p $(TOOLS)/path && ln -sf ../bin/checkov $(TOOLS)/path/checkov && touch $(TOOLS_STAMP); \
	else echo "make: checkov did not install; the tests that need it will be skipped"; fi

# The lock leaves torch (and its CUDA wheels) out: TORCH_SPEC and the image's TORCH_INDEX_URL choose the build.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --all-extras --no-header \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch \
		$$($(BIN)/uv pip compile pyproject.toml --extra worker --python-version 3.11 \
			--python-platform x86_64-manylinux_2_28 2>/dev/null | grep -oE '^(nvidia-|triton|cuda-)[^=]*' \
			| sed 's/^/--no-emit-package /') \
		-o $(LOCK)

clean:
	rm -rf $(VENV) $(TOOLS) .modtag .pytest_cache .mypy_cache .ruff_cache
