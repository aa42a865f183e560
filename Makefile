# Two commands for a fresh machine:
#   make demo   installs invops in .venv and runs the main demo (i-RIM vs tuned PyLops post-stack
#               inversions) on synthetic earth models
#   make test   installs invops with its test extras in .venv and runs the test suite
#               (with the mpi extra and the mpich wheel, so the mpiexec tests run too)
# Also: make lint (ruff, mypy), make docs (the site, to docs/_build/html), make dist (wheel, sdist)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test lint install clean bench-deps bench docs dist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,examples,dev,mpi]" mpich

demo: install
	$(BIN)/python examples/irim_seismic.py --out examples/output/irim_seismic.png

# the benchmark peers are installed too, so that the benchmark smoke tests run in full
test: bench-deps
	$(BIN)/python -m pytest -q

# the peers of the benchmarks, without their dependencies so that torch stays as pinned
bench-deps: install
	$(PIP) install --quiet --no-deps normflows==1.7.3 memcnn==1.5.2
	$(PIP) install --quiet --no-deps -c constraints.txt deepinv torchvision torchmetrics einops natsort h5py
	$(PIP) install --quiet -c constraints.txt requests  # imported by deepinv; pure Python

# the CPU runs reported in BENCHMARKS.md (about 45 minutes on 2 cores; see benchmarks/README.md)
bench: bench-deps
	$(BIN)/python benchmarks/glow_memory_time.py --sweep depth --allocator tuned
	$(BIN)/python benchmarks/glow_memory_time.py --sweep depth
	$(BIN)/python benchmarks/glow_memory_time.py --sweep size --sizes 32 64 128 --allocator tuned
	$(BIN)/python benchmarks/jacobian_cost.py
	$(BIN)/python benchmarks/irim_unrolled.py --allocator tuned
	$(BIN)/python benchmarks/segmentation_memory.py --threads 1

lint: install
	$(BIN)/ruff check invops tests examples $(wildcard benchmarks) docs/conf.py docs/gallery
	$(BIN)/ruff format --check invops tests examples $(wildcard benchmarks) docs/conf.py docs/gallery
	$(BIN)/mypy

# the documentation site, warnings as errors; the gallery runs the examples at reduced size
docs: install
	$(PIP) install --quiet -c constraints.txt -e ".[docs]"
	OMP_NUM_THREADS=1 $(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# wheel and sdist in dist/ (tests/test_packaging.py checks and installs the wheel)
dist: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/api/generated docs/auto_examples
