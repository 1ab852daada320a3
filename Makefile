# Two entry points for a fresh machine: `make demo` and `make test`.
# The CPU build of torch goes in first, so the package's own torch range is
# already met and pip never fetches a multi-GB CUDA build. On a machine whose
# package index serves CUDA builds by default, point TORCH_INDEX at a CPU index
# (or set TORCH to the build you want).
# `make demo` installs only what running needs; `make test` adds the test tools.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
DEMO_DIR ?= demo
# Editable installs as a plain .pth entry: the package is the working tree, and setuptools
# has no import hook to warn about.
EDITABLE := --config-settings editable_mode=compat

.PHONY: install install-test demo test check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e .
	touch $@

# The real network's test (tests/test_real_network.py) runs DLR's cloud-mask graph on
# xarray-spatial's Sentinel-2 sample bands: both packages are data there, neither is
# imported, so their own dependencies (numba, datashader, scipy) are not installed.
REAL_NETWORK_DATA := "ukis-csmask==1.0.0" "xarray-spatial==0.5.3"

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(REAL_NETWORK_DATA)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/fcn-pipeline sample-scenes $(DEMO_DIR)/scenes --count 2 --size 2048
	$(BIN)/fcn-pipeline run "$(DEMO_DIR)/scenes/*.tif" --model demo --out $(DEMO_DIR)/out

# The gates first (lint and types take seconds), then the suite; pytest's exit code 5
# (no tests collected) counts as a pass.
check: install-test
	$(BIN)/ruff check pipeline tests
	$(BIN)/mypy

# The suite runs its test files on TEST_JOBS processes (pytest-xdist): most tests run the
# real CLI, each mostly on one core, so two at once keep two cores busy.
TEST_JOBS ?= 2

test: check
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO_DIR)
