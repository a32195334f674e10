# Top-level entry points. `make test` sets up everything on a fresh Debian 12
# machine (apt packages, the kernel matrix, the venv) and runs the whole suite
# against every kernel of the matrix.

# Guest kernels the kernel tests boot: tests/kernel/test-kernels (one Debian
# release's kernel per line), or TEST_KVERS="KVER ..." (or "SUITE:KVER ...")
# to run a subset.
TEST_KVERS ?=

# Per-kernel builds, logs and the results table (build/ is not tracked).
MATRIX := build/matrix

VENV   := .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: all test matrix unit kmod provision venv clean matrix-purge dist demo deb

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

# Provision the host and the matrix (chroots and images cached in
# /var/cache/tcpsecrets-matrix), then tests/kernel/matrix.py: DKMS-build the
# module for each kernel in a chroot of its release, run pytest (the kernel
# tests once per kernel, MATRIX_JOBS kernels at a time, default 2; logs in
# $(MATRIX)/KVER/pytest.log) and write $(MATRIX)/results.md from what ran.
MATRIX_RUN = kvers="$$(tests/provision-host.sh $(TEST_KVERS))" && \
	TEST_KVERS="$$kvers" $(PY) -m tests.kernel.matrix run

# Everything: the tests that boot no kernel (with the installer's system tests,
# which must not skip: provisioning built their image), then the kernel tests
# on every matrix kernel.
test: export SYSTEM_TESTS = required
test: venv
	$(MATRIX_RUN) -- $(PYTEST_ARGS)

# The kernel tests only (DKMS builds, static checks, guests) on every matrix
# kernel; then the README's matrix table is replaced by this run's (pass or fail).
matrix: venv
	$(MATRIX_RUN) --kernel-only -- $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m tests.kernel.matrix readme && exit $$rc

# Fast loop while editing: no VM boots.
unit: venv
	$(PY) -m pytest -m 'not kernel and not system' $(PYTEST_ARGS)

.PHONY: fuzz bench

# Fuzz every parser of untrusted or admin input (tests/fuzz): at least
# 100,000 inputs per test (hypothesis profile "fuzz"; `make unit` and
# `make test` run the same tests with a few thousand inputs in all).
fuzz: venv
	MITIGATOR_FUZZ_PROFILE=fuzz $(PY) -m pytest -p no:cacheprovider --hypothesis-show-statistics tests/fuzz $(PYTEST_ARGS)

# The agent's `get` against OpenSSH's sshd (reference) and a bare asyncssh
# server (floor), then a 50,000-poll soak; a few minutes, as root (sshd).
# Results in build/bench/results.md.  BENCH_ARGS="--soak 10000 ..." to vary.
# Then the module's cookie-accept hook in a booted guest: cookie connections/s
# with the module against the stock kernel after a SYN-queue overflow, on the
# host release's matrix kernel, provisioned as `make test` does (one qemu TCG
# boot, several minutes). Results in build/bench/cookie-hook.md.
# HOOK_BENCH_ARGS="--connections 5000 --rounds 3 ..." to vary.
bench: venv
	$(PY) bench/bench.py $(BENCH_ARGS)
	kver="$$(tests/provision-host.sh "bookworm:$$(awk '$$1 == "bookworm" { print $$2 }' tests/kernel/test-kernels)")" && \
	$(PY) bench/cookie_hook.py --kver "$$kver" $(HOOK_BENCH_ARGS)

# dist/mitigator-agent: the one-file installer (module source, agent, wheels for
# every supported CPython; wheels cached in /var/cache/mitigator-agent-build).
dist: venv
	installer/make-dist.sh

# The whole system in a VM: boot the Debian 12 test image (built and cached by
# tests/installer/system-image.sh), install with dist/mitigator-agent as an
# admin would, add a key, poll from here with OpenSSH and `mitigator-agent poll`.
demo: venv dist
	tests/provision-host.sh "bookworm:$$(awk '$$1 == "bookworm" { print $$2 }' tests/kernel/test-kernels)" >/dev/null
	$(PY) -m tests.installer.demo dist/mitigator-agent

# The Debian packages tcpsecrets-dkms and mitigator-agent in dist/, checked by
# lintian (packaging/build-deb.sh; sets up its build dependencies and caches
# the wheels in /var/cache/mitigator-agent-build). VERSION=N.N.N builds
# another version than kmod/VERSION (upgrade tests) without editing a file.
VERSION ?=
deb:
	packaging/build-deb.sh $(VERSION)

clean:
	$(MAKE) -C kmod clean
	rm -rf $(VENV) build *.egg-info

# Forget the matrix's cache (chroots, images; /var/cache/tcpsecrets-matrix):
# the next `make test` provisions as on a fresh machine.
matrix-purge:
	tests/kernel/matrix-chroot.sh purge
