# The two README commands: `make demo` (main job on the embedded images) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_WEIGHTS := $(abspath ../shared/weights/bvlc_googlenet.safetensors)
# Use the shared BVLC weights when present (this machine, CI); otherwise download inception5h.
ifneq ($(wildcard $(SHARED_WEIGHTS)),)
export BRANCHLENS_BVLC_WEIGHTS ?= $(SHARED_WEIGHTS)
VARIANT ?= bvlc_googlenet
else
VARIANT ?= inception5h
endif

.PHONY: demo test lint bench clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.stamp
	$(BIN)/branchlens info --variant $(VARIANT)
	$(BIN)/branchlens run --preset demo --variant $(VARIANT) --out runs/demo

test: $(VENV)/.stamp
	bash scripts/ensure_chromium.sh || echo "chromium could not be installed: the browser test will skip (fails under CI=true)"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.stamp
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
