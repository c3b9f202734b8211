# `make test` and `make demo` each build .venv from nothing when it is missing.
#
# evserver is installed into .venv NON-editable, as a user would install it,
# so twistd finds the plugin the way it will in production
# (site-packages/twisted/plugins/evserver_plugin.py).  The install is redone
# whenever a source file changes, so the tests (which import the checkout)
# and `.venv/bin/twistd` (which runs the installed copy) always agree.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-stamp
INSTALL_STAMP := $(VENV)/.install-stamp
# Every source file and directory (a directory's time changes when a file is
# added or removed), without the bytecode caches.
SOURCES := $(shell find evserver twisted/plugins -name __pycache__ -prune \
	-o -type d -print -o -type f \( -name '*.py' -o -name '*.css' -o -name '*.js' \) -print)

.PHONY: all test soak lint demo bench clean

all: test

# Dependencies: only when the packaging metadata changes.
$(DEPS_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation ".[test]"
	touch $@

# evserver itself: cheap (no dependency resolution, no build isolation).
$(INSTALL_STAMP): $(DEPS_STAMP) $(SOURCES) setup.cfg pyproject.toml README.rst
	rm -rf build
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	touch $@

test: $(INSTALL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The state machines with random seeds and EVS_SOAK times their examples.
EVS_SOAK ?= 20
soak: $(INSTALL_STAMP)
	EVS_SOAK=$(EVS_SOAK) HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -p no:cacheprovider \
		-m "not real" -k "Machine or TestClusterBalancing" --hypothesis-show-statistics

lint: $(INSTALL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy evserver

demo: $(INSTALL_STAMP)
	$(BIN)/python -m evserver.tools.demo

bench: $(INSTALL_STAMP)
	$(BIN)/ev-bench relay

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f twisted/plugins/dropin.cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
