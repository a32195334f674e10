# Top-level entry points. `make test` sets up everything on a fresh Debian 12
# machine (apt packages, guest kernels, the venv) and runs the whole suite.

# Guest kernels the kernel tests boot: tests/kernel/test-kernels, or
# TEST_KVERS="KVER ..." to override.
TEST_KVERS ?= $(shell sed -e 's/\#.*//' tests/kernel/test-kernels)

VENV   := .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: all test unit kmod provision venv clean

all: kmod

kmod:
	$(MAKE) -C kmod

provision:
	tests/provision-host.sh $(TEST_KVERS)

# Reinstalled only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	kvers="$$(tests/provision-host.sh $(TEST_KVERS))" && \
	TEST_KVERS="$$kvers" $(PY) -m pytest $(PYTEST_ARGS)

# Fast loop while editing: no VM boots.
unit: venv
	$(PY) -m pytest -m 'not kernel' $(PYTEST_ARGS)

clean:
	$(MAKE) -C kmod clean
	rm -rf $(VENV) build *.egg-info
