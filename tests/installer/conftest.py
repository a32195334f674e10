"""Fixtures for the system tests: a real Debian 12 system booted in qemu (system.py).

A test that uses `debian_system` is marked `system` (slow: it boots a guest
under TCG). Without the cached image (tests/installer/system-image.sh) such
tests are skipped, saying how to build it — unless SYSTEM_TESTS=required
(`make test` sets it), where a missing image is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, List

import pytest

from .system import CACHE, DebianSystem, GuestCommandError, GuestError, SystemImage


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Mark every test that boots a system `system`, so `-m 'not system'` leaves it out."""
    for item in items:
        if "debian_system" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.system)


def usable(image: SystemImage) -> SystemImage:
    """`image`, if it can boot; else skips (or, with SYSTEM_TESTS=required, fails) saying how to build it."""
    problem = image.problem()
    if problem:
        if os.environ.get("SYSTEM_TESTS") == "required":
            pytest.fail(f"SYSTEM_TESTS=required but {problem}", pytrace=False)
        pytest.skip(problem)
    return image


@pytest.fixture(scope="module")
def system_image() -> SystemImage:
    """The cached Debian 12 image (see usable())."""
    return usable(SystemImage(CACHE))


# What the guest logged about installs, kept after the run (build/installer/guest-logs/MODULE/):
# with timestamps, they say which step of a slow or failed run took the time.
GUEST_LOGS = ("/var/log/mitigator-agent-install.log", "/var/log/dpkg.log", "/var/log/apt/term.log")
KEPT_LOGS = Path(__file__).resolve().parents[2] / "build" / "installer" / "guest-logs"


def keep_guest_logs(system: DebianSystem, module: str) -> None:
    """Copy GUEST_LOGS out of a running guest (those it has) into KEPT_LOGS/module."""
    where = KEPT_LOGS / module
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for path in GUEST_LOGS:
        try:
            (where / Path(path).name).write_bytes(system.get(path))
        except (GuestCommandError, GuestError):  # absent, or the guest is gone: nothing to keep
            continue


@contextlib.contextmanager
def booted(image: SystemImage, tmp_path_factory: pytest.TempPathFactory, logs_name: str) -> Iterator[DebianSystem]:
    """A system booted from `image`; powered off (qemu reaped) afterwards.

    Its console log stays in pytest's temporary directory (named in every
    error the system raises); its install logs are copied to KEPT_LOGS/logs_name.
    """
    system = DebianSystem(image, workdir=tmp_path_factory.mktemp("debian-system"))
    try:
        system.start()
        yield system
    finally:
        keep_guest_logs(system, logs_name)
        system.stop()


@pytest.fixture(scope="module")
def debian_system(system_image: SystemImage, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[DebianSystem]:
    """One booted Debian 12 system for the module's tests (see booted())."""
    with booted(system_image, tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1]) as system:
        yield system
