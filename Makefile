# The two commands a newcomer runs: `make demo` and `make test`.
# Both create the virtual environment if it is missing and install everything.
#   make install [SPCONV=auto|cu118|cu120|cu121|cu124|cu126] [WHEELHOUSE=wheels/]
#   make wheelhouse [PYVER=3.12] [SPCONV=auto] [TORCH_CUDA=12.6|none] [DEST=wheels/] [SPLIT_MB=60]
#   make gpu-check [GPU_CHECK_OUT=runs/gpu-check]
VENV ?= .venv
SPCONV ?= auto
PYTHON ?= python3
WHEELHOUSE ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sparsegps-installed
# Runs with the bare interpreter: picks the spconv build, smoke-tests it, builds wheelhouses.
INSTALL_TOOL := sparsegps/install.py
# With WHEELHOUSE every package comes from that folder and nothing from the network (set through
# pip's environment, which the pip runs inside builds inherit).
ifneq ($(WHEELHOUSE),)
export PIP_NO_INDEX := 1
export PIP_FIND_LINKS := $(abspath $(WHEELHOUSE))
endif
# pytest worker threads: spconv and torch share the cores.
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-slow install wheelhouse gpu-check clean-demo grounding

install: $(STAMP)

# A venv sees the base interpreter's packages when that interpreter has torch (a GPU machine's own
# torch and Triton stay in use).
$(PY):
	if $(PYTHON) -c "import torch" 2>/dev/null; then flags=--system-site-packages; fi; \
	  $(PYTHON) -m venv $$flags $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel

# torch first, pinned only when none is importable (an unpinned torch pulls a multi-GB CUDA build;
# GPU machines keep their own). torch-scatter and deepspeed build against that torch; where
# torch-scatter cannot be built, pooling runs on native torch (`sparsegps doctor` says so).
# The install ends with one sparse convolution forward and backward.
$(STAMP): setup.py $(INSTALL_TOOL) | $(PY)
	$(if $(WHEELHOUSE),$(PY) $(INSTALL_TOOL) join $(WHEELHOUSE))
	$(PY) -c "import torch" 2>/dev/null || { \
	  if [ -n "$(WHEELHOUSE)" ]; then echo "error: a wheelhouse install needs torch already importable by $(PYTHON) (wheelhouses leave torch out)" >&2; exit 1; fi; \
	  $(PIP) install torch==2.13.0; }
	$(PIP) install -q "setuptools>=64" wheel ninja packaging psutil py-cpuinfo
	$(PY) -c "import torch_scatter" 2>/dev/null || $(PIP) install --no-build-isolation torch-scatter \
	  || echo "warning: torch-scatter did not build; pooling will use native torch ops" >&2
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install --no-build-isolation deepspeed
	build=$$($(PY) $(INSTALL_TOOL) choose --spconv "$(SPCONV)") && $(PIP) install -e ".[$$build,dev]"
	$(PY) $(INSTALL_TOOL) smoke
	touch $@

# The suite without its slow cases (under 15 minutes on 2 cores); `make test-slow` runs those
# (end-to-end runs on several ranks, restarts, the demo); CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	$(PY) -m sparsegps.demo --out runs/demo

# Pre-training and grounding fine-tuning that learn the relation, not only the class (45 minutes on
# 2 CPU cores).
grounding: $(STAMP)
	$(PY) -m sparsegps.recipes.grounding --out runs/grounding

# Everything but torch for an offline install on a machine of another Python / CUDA.
PYVER ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TORCH_CUDA ?= 12.6
DEST ?= wheels
SPLIT_MB ?= 0
# Runs in the venv: pip reads torch-scatter's and DeepSpeed's source metadata by importing torch.
wheelhouse: $(STAMP)
	$(PY) $(INSTALL_TOOL) wheelhouse --dest $(DEST) --python $(PYVER) --spconv "$(SPCONV)" \
	  --torch-cuda $(TORCH_CUDA) --split-mb $(SPLIT_MB)

# On a CUDA machine: GPU tests, the kernel's compile report, GPU benchmarks and train steps, one
# report. Without a GPU it says so and exits 0.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); else py=$(PYTHON); fi; \
	  $$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
	  || { echo "gpu-check: no GPU (torch.cuda.is_available() is False or torch is missing): nothing to check"; exit 0; }; \
	  $(MAKE) --no-print-directory install && $(PY) -m sparsegps.benchmarks.gpu_check --out $(GPU_CHECK_OUT)
