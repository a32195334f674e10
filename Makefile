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

# The locks: the exact version and hashes of every package pip installs for the project.
#   agent/requirements.lock  the agent's runtime dependencies, for every CPython the packages
#                            support (Debian 11's 3.9.2 and newer); `make dist` and `make deb`
#                            bundle exactly these, and the install script installs them by hash
#   tests/requirements.lock  the test venv: the same runtime pins, pyproject's [test] extra and
#                            the tools of tests/requirements.in
# pyproject.toml keeps ranges (a `pip install` user still gets newer releases); `make lock`
# moves the locks to the newest releases those ranges admit, and a bump is a commit that ran
# `make test`. `make test-newest` tries the newest releases without touching the locks.
RUNTIME_LOCK := agent/requirements.lock
TEST_LOCK    := tests/requirements.lock
PIP_INSTALL  := -m pip install -q --disable-pip-version-check

.PHONY: all test matrix unit kmod provision venv clean matrix-purge dist demo deb lock test-newest matrix-refresh test-long

all: kmod

kmod:
	$(MAKE) -C kmod

provision:
	tests/provision-host.sh $(TEST_KVERS)

# Made anew when the project's dependencies change: exactly the locked versions, checked by
# hash, then the agent itself (editable, built by the locked setuptools).
$(VENV)/.installed: pyproject.toml $(RUNTIME_LOCK) $(TEST_LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --require-hashes --no-deps -r $(TEST_LOCK)
	$(PY) $(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.installed

# Resolve both locks again with uv (itself locked): the newest releases pyproject.toml's ranges
# admit, for CPython 3.9.2 and newer (runtime) and 3.11 and newer (tests; Debian 12's python3).
# LOCK_UPGRADE="--upgrade-package asyncssh" moves one package only; LOCK_UPGRADE= none.
LOCK_UPGRADE ?= --upgrade
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --universal --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_UPGRADE)
lock: venv
	$(UV_COMPILE) --python-version 3.9.2 -o $(RUNTIME_LOCK) pyproject.toml
	$(UV_COMPILE) --python-version 3.11 -c $(RUNTIME_LOCK) -o $(TEST_LOCK) \
		--extra test pyproject.toml tests/requirements.in
	@git diff --stat -- $(RUNTIME_LOCK) $(TEST_LOCK)

# The tests that boot nothing, in a throwaway venv with the newest release of every dependency
# (pyproject.toml's ranges, no lock), and every command's stderr checked for lines that are not
# ours: what PyPI will give the next `make lock` and every `pip install` user. Outside `make test`,
# so that a release on PyPI never breaks a landing. Which versions it ran: build/newest/versions.txt.
NEWEST := build/newest
test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)/venv
	$(NEWEST)/venv/bin/python $(PIP_INSTALL) --upgrade pip
	$(NEWEST)/venv/bin/python $(PIP_INSTALL) --upgrade --upgrade-strategy eager -e '.[test]'
	$(NEWEST)/venv/bin/python -m pip freeze --exclude-editable >$(NEWEST)/versions.txt
	$(NEWEST)/venv/bin/python packaging/lockfile.py compare $(TEST_LOCK) $(NEWEST)/versions.txt
	$(NEWEST)/venv/bin/python -m pytest -p no:cacheprovider -m 'not kernel and not system' \
		--deselect tests/unit/test_locks.py::test_the_venv_runs_the_locked_versions $(PYTEST_ARGS)

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

# What cannot fit in `make test`'s budget, run before resolving work on kmod/, installer/ or
# packaging/: the kernel tests on the kernels of tests/kernel/test-kernels-long (each release's
# point-release kernel, which servers boot until their first security update), provisioned as
# `make test` provisions its own, and beside them the system scenarios marked `long` (a server's
# later life: a kernel security update, tests/installer/test_kernel_update_*.py; a failed move of an
# older script's install, tests/installer/test_failed_move.py; a Debian release upgrade,
# tests/installer/test_release_upgrade_*.py). The run's
# dated table replaces the README's test-long table (pass or fail); build/matrix/results-long.md,
# build/matrix/KVER/ and build/matrix/system-long-*/ keep the details.
test-long: export SYSTEM_TESTS = required
test-long: venv
	kvers="$$(SYSTEM_IMAGE_SUITES="bookworm bullseye" tests/provision-host.sh --list tests/kernel/test-kernels-long)" && \
	TEST_KVERS="$$kvers" $(PY) -m tests.kernel.matrix run --table long -- $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m tests.kernel.matrix readme --table long && exit $$rc

# Move the pins of tests/kernel/test-kernels to each release's current kernel (its archive's
# linux-image-amd64), provision them and DKMS-build the module for each: a kernel the module no
# longer builds for shows up here, before the commit that moves the pins (which must pass
# `make test`). Every provisioning names a release whose kernel moved on since (NOTICE lines).
matrix-refresh: venv
	$(PY) -m tests.kernel.matrix refresh
	kvers="$$(tests/provision-host.sh)" && TEST_KVERS="$$kvers" $(PY) -m tests.kernel.matrix build
	@git diff --stat -- tests/kernel/test-kernels

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

# dist/mitigator-agent: the one-file installer, carrying the two Debian packages
# (built as `make deb` builds them, without lintian; wheels cached in
# /var/cache/mitigator-agent-build), which it has apt install on the server.
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
