# The two commands the README opens with: `make demo` and `make test`.
# Both create or refresh .venv from pyproject.toml first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.facefed-installed

.PHONY: demo test lint install benchmarks clean gpu

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/facefed demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	bash tests/tools/run_tests.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

benchmarks: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# Swaps the CPU builds of onnxruntime and faiss for the GPU ones listed in the
# `gpu` extra (both builds provide the same modules, so they cannot coexist).
GPU_PACKAGES = $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu']))")

gpu: $(STAMP)
	$(BIN)/python -m pip uninstall --yes onnxruntime faiss-cpu
	$(BIN)/python -m pip install --quiet $(GPU_PACKAGES)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
