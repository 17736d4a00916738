# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
# GPU machines: make TORCH="torch" CUCIM="cucim-cu12" EXTRAS="dev,gpu" CONSTRAINTS=  (see README).
TORCH ?= torch==2.13.0
CUCIM ?= cucim-cu13
EXTRAS ?= dev
# The versions the suite was last verified with; through the environment so that pip's isolated build of
# our C++ extension (scikit-build-core, pybind11) takes them too. CONSTRAINTS= installs unpinned.
CONSTRAINTS ?= constraints.txt
PIP := $(if $(CONSTRAINTS),PIP_CONSTRAINT="$(abspath $(CONSTRAINTS))") $(PY) -m pip
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml CMakeLists.txt $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.hpp)

.PHONY: install test test-all test-orders demo lint bench check-kernels clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps "$(CUCIM)" lazy-loader
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# The suite must not depend on test order: file order reversed, then three random orders (modules in a
# random order, tests shuffled within each; seeds given, so a failure can be replayed with
# `pytest --random-order-bucket=module --random-order-seed=N`). A global shuffle (ORDER_BUCKET=global)
# also works, but rebuilds module fixtures at every module switch and takes about twice as long.
ORDER_BUCKET ?= module
test-orders: $(STAMP)
	$(PY) -m pytest -q $$(ls tests/test_*.py | sort -r)
	for seed in 1 2 3; do $(PY) -m pytest -q --random-order-bucket=$(ORDER_BUCKET) --random-order-seed=$$seed || exit 1; done

demo: $(STAMP)
	$(VENV)/bin/gigassl-fast demo --out demo_out $(if $(wildcard ../shared/data/slides),--sample-slides data/sample_slides.csv)

lint: $(STAMP)
	$(VENV)/bin/ruff check python tests benchmarks kernels tools

bench: $(STAMP)
	$(VENV)/bin/gigassl-fast bench

# Compile every Triton kernel for sm_90 with a given Triton (default: the GPU machines' 3.6.0), no GPU
# needed: `make check-kernels` or `make check-kernels TRITON=3.5.0`.
TRITON ?= 3.6.0
check-kernels: $(STAMP)
	test -d build/triton-$(TRITON) || $(PY) -m pip install -q --no-deps --target build/triton-$(TRITON) triton==$(TRITON)
	PYTHONPATH=build/triton-$(TRITON) $(PY) tools/compile_kernels.py

clean:
	rm -rf build $(VENV) demo_out .pytest_cache
