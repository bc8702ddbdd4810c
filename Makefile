# gptpar: every target works from a fresh clone (creates .venv, installs pinned deps, builds the extension).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
EXT_SRCS := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)

.PHONY: test demo bench gpu install clean

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

# tests/test_packaging.py also compile-checks every csrc/**/*.cu for sm_90 when nvcc exists.
test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m gptpar.demo

# Every side-by-side comparison (gptpar vs PyTorch's own, same run) and the op micro-benchmarks; each
# script writes bench/results/*.json. About 4 minutes on 2 cores.
bench: install
	$(PY) -m pytest -q bench/bench_*.py --benchmark-only -p no:cacheprovider
	$(PY) bench/ops_bandwidth.py
	$(PY) bench/tensor_parallel.py
	$(PY) bench/zero.py
	$(PY) bench/data_parallel.py
	$(PY) bench/pipeline.py
	$(PY) bench/context_parallel.py
	$(PY) bench/planner.py

# On a GPU machine (no internet; its own torch + triton): build the extension with CUDA into that Python,
# run the GPU-only tests, then the kernel suite (writes bench/results/gpu_suite.json).
GPU_PY ?= python3
gpu:
	$(GPU_PY) -m pip install --no-build-isolation --no-deps -e .
	$(GPU_PY) -m pytest -q tests/test_kernels_gpu.py tests/test_ops_grad_cuda.py tests/test_kernels_compile.py
	$(GPU_PY) bench/gpu_suite.py

clean:
	rm -rf $(VENV) build *.egg-info gptpar/_C*.so
