# gptpar: every target works from a fresh clone (creates .venv, installs pinned deps, builds the extension).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
CU_SRCS := $(shell find csrc -name '*.cu' 2>/dev/null)
EXT_SRCS := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)

.PHONY: test demo bench cuda-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/deps: requirements.txt | $(PY)
	@mkdir -p $(STAMPS)
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps setup.py $(EXT_SRCS)
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $@

install: $(STAMPS)/build

# Compile-check every CUDA source for sm_90 (CI has nvcc but no GPU; kernels are plain .cu with raw-pointer launchers).
cuda-check:
ifneq ($(NVCC),)
	@mkdir -p build/cuda-check
	@for f in $(CU_SRCS); do echo "nvcc -c -arch=sm_90 $$f"; $(NVCC) -c -arch=sm_90 -O3 -Icsrc $$f -o build/cuda-check/$$(basename $$f).o || exit 1; done
else
	@echo "cuda-check: nvcc not found, skipping CUDA compile check"
endif

test: install cuda-check
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m gptpar.demo

bench: install
	$(PY) -m pytest -q bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info gptpar/_C*.so
