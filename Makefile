# Two entry points for a fresh machine; each sets itself up in a local virtual
# environment. torch is pinned to 2.13.0 (CPU build) so that nothing pulls the
# multi-GB CUDA wheels; set TORCH_SPEC to use another build.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,io,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/densiformer demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/densiformer bench

clean:
	rm -rf $(VENV) densiformer_demo .pytest_cache
