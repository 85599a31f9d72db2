# moekit: the two commands are `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch this project is tested with; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The venv's bin first for every process: one ninja builds DeepSpeed's C++ ops (pip's and Debian's hash the build
# commands differently, so each rebuilds what the other built), and deepspeed/jupyter are this venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# The browser test (tests/test_browser.py) drives Debian's Chromium; MOEKIT_SKIP_BROWSER=1 skips it (laptops only).
CHROMIUM ?= /usr/bin/chromium
export MOEKIT_CHROMIUM := $(CHROMIUM)

.PHONY: setup browser-deps lab test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"

# Chromium for the browser test (playwright itself comes with the dev extra; it never downloads a browser).
browser-deps: setup
	@if [ -x "$(CHROMIUM)" ] || [ "$$MOEKIT_SKIP_BROWSER" = 1 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser test (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "The browser test needs Chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium' (Debian)," \
			"or pass CHROMIUM=/path/to/chromium, or set MOEKIT_SKIP_BROWSER=1 to skip that test." >&2; \
		exit 1; \
	fi

lab: setup
	$(BIN)/jupyter lab notebooks/

lint: setup
	$(BIN)/ruff check moekit tests benchmarks scripts notebooks

test: lint browser-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache .pytest_cache test-artifacts
