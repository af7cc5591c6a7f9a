# tilefuse: two commands for a fresh machine.
#   make demo  -> sets up .venv and runs the main demo
#   make test  -> sets up .venv and runs the test suite (the CI lane)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines carry a CPU wheel of torch 2.13.0 on disk; install that pin first so pip never
# pulls a multi-GB CUDA build. On a machine where torch is already importable nothing is replaced.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-all bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m tilefuse.demo

test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not cuda"

test-all: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench: venv
	$(BIN)/tilefuse bench kernels

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
