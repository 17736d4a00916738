# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
# GPU machines: make TORCH="torch" CUCIM="cucim-cu12" EXTRAS="dev,gpu"  (see README).
TORCH ?= torch==2.13.0
CUCIM ?= cucim-cu13
EXTRAS ?= dev
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp)

.PHONY: install test test-all demo lint bench check-kernels clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps "$(CUCIM)" lazy-loader
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(VENV)/bin/gigassl-fast demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check python tests benchmarks kernels

bench: $(STAMP)
	$(VENV)/bin/gigassl-fast bench

# Compile every Triton kernel for sm_90 with a given Triton (default: the GPU machines' 3.6.0), no GPU
# needed: `make check-kernels` or `make check-kernels TRITON=3.5.0`.
TRITON ?= 3.6.0
check-kernels: $(STAMP)
	test -d build/triton-$(TRITON) || $(PY) -m pip install -q --no-deps --target build/triton-$(TRITON) triton==$(TRITON)
	PYTHONPATH=build/triton-$(TRITON) $(PY) benchmarks/compile_kernels.py

clean:
	rm -rf build $(VENV) demo_out .pytest_cache
