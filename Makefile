# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv/ and installs s4v into it on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.s4v-installed
export HF_HUB_OFFLINE := 1
# The venv's tools first (its ninja builds DeepSpeed's CPU comm op; a different ninja rebuilds it).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv demo test test-gpu clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip
	$(VPY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m s4v.demo

test: $(STAMP)
	$(VPY) -m pytest -q tests

# GPU checks (run on a machine with CUDA): `make test-gpu`
test-gpu: $(STAMP)
	$(VPY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
