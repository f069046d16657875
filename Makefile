# The two commands a newcomer runs: `make demo` and `make test`.
# Both create the virtual environment if it is missing and install everything.
VENV ?= .venv
SPCONV ?= cu120
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sparsegps-installed
# pytest worker threads: spconv and torch share the cores.
export OMP_NUM_THREADS ?= 2

.PHONY: demo test install clean-demo

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch first, pinned only when none is importable (an unpinned torch pulls a multi-GB CUDA build;
# GPU machines keep their own). torch-scatter and deepspeed build against that torch.
$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q ninja packaging psutil py-cpuinfo
	$(PY) -c "import torch_scatter" 2>/dev/null || $(PIP) install --no-build-isolation torch-scatter
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install --no-build-isolation deepspeed
	$(PIP) install -e ".[$(SPCONV),dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m sparsegps.demo --out runs/demo
