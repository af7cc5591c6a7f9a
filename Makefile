# tilefuse: two commands for a fresh machine.
#   make demo  -> sets up .venv and runs the main demo
#   make test  -> sets up .venv and runs the test suite (the CI lane)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines carry a CPU wheel of torch 2.13.0 on disk; install that pin first so pip never
# pulls a multi-GB CUDA build. On a machine where torch is already importable nothing is replaced.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv ext demo test test-all bench compat aot36 clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

venv: $(BIN)/.installed

# the C++ autograd node (tilefuse/_graph_node.py): ~10 s once per torch version, then a no-op;
# without a C++ compiler the ops keep torch.autograd.Function (same results, more host time)
ext: venv
	$(BIN)/tilefuse build-ext || echo "make: tilefuse build-ext failed; continuing without it"

demo: venv ext
	@echo "make demo: about 4 minutes on a busy 2-core CPU (measured; 1.5 min of CPU time, the training run is most of it), after the one-time .venv set-up"
	$(BIN)/python -m tilefuse.demo

test: venv ext
	$(BIN)/ruff check tilefuse tests tools
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not cuda"

test-all: venv ext
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# The GPU machines' versions on a CPU machine: torch 2.11 pins triton 3.6. PyPI's torch 2.11 is a
# CUDA build (about 4.6 GB in the venv; it runs on the CPU). Runs the interpreter lane and compiles
# every kernel launch for sm_90 with triton 3.6's ptxas (tools/aot_check.py). Not part of CI.
COMPAT_VENV := .venv-compat
COMPAT_TORCH ?= torch==2.11.0
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPAT_VENV)/bin/pip install -q $(COMPAT_TORCH)
	$(COMPAT_VENV)/bin/pip install -q -e '.[test,bench]'
	$(COMPAT_VENV)/bin/tilefuse build-ext || echo "make: tilefuse build-ext failed under torch 2.11"
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q -n 2 -m "not slow and not cuda"
	$(COMPAT_VENV)/bin/python tools/aot_check.py

# sm_90 compile check with the GPU machines' triton (3.6) on this CPU machine, without a second
# torch: triton 3.6 goes into $(T36_SITE) (pip --target, no deps) and shadows the venv's triton
# through PYTHONPATH; torch stays the venv's. Uses the wheel on disk when there is one (else
# PyPI's, about 170 MB). One family per process keeps memory low on small machines
# (docs/aot_check.md). AOT36_ARGS passes options to tools/aot_check.py (e.g. -j 1).
T36_DIR := .venv-t36
T36_SITE := $(T36_DIR)/site
T36_WHEEL ?= $(firstword $(wildcard /opt/pypi/files/triton-3.6.0-*.whl) triton==3.6.0)
AOT_FAMILIES ?= matmul int8 fp8 depthwise conv norm dropout optim
AOT36_ARGS ?=
aot36: venv
	test -f $(T36_SITE)/triton/__init__.py || $(BIN)/pip install -q --no-deps --target $(T36_SITE) $(T36_WHEEL)
	PYTHONPATH=$(T36_SITE) $(BIN)/python -c "import triton; v = triton.__version__; assert v.startswith('3.6'), 'triton ' + v + ' shadows 3.6'; print('triton', v, 'from', triton.__file__)"
	rc=0; for f in $(AOT_FAMILIES); do PYTHONPATH=$(T36_SITE) $(BIN)/python tools/aot_check.py --families $$f $(AOT36_ARGS) || rc=1; done; exit $$rc

bench: venv
	$(BIN)/tilefuse bench kernels

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(T36_DIR) build *.egg-info .pytest_cache
