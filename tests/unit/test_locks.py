"""The locks (`make lock`): complete, hashed, within pyproject's ranges, and what the venv runs."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.packaging.debs import supported_pythons

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging"))
import lockfile  # noqa: E402  (packaging/lockfile.py, a script of make-dist.sh and build-deb.sh)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11's Python 3.9
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = REPO / "agent" / "requirements.lock"
TEST_LOCK = REPO / "tests" / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Each release's python3 that make-dist.sh bundles wheels for and the Debian package runs on.
DIST_PYTHONS = supported_pythons()


def runtime_requirements(python: str) -> list[Requirement]:
    """pyproject's runtime dependencies that hold for CPython `python` on Linux."""
    env = lockfile.environment(python)
    return [r for r in map(Requirement, PYPROJECT["project"]["dependencies"])
            if r.marker is None or r.marker.evaluate(env)]


def test_every_entry_is_pinned_with_hashes():
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        entries = lockfile.read(lock)
        assert entries, lock
        for entry in entries:
            assert entry.hashes and all(h.startswith("sha256:") for h in entry.hashes), entry


def test_the_dist_pythons_are_the_ones_the_packages_support():
    assert DIST_PYTHONS == ["3.9.2", "3.10.12", "3.11.2", "3.12.3", "3.13.5"]


@pytest.mark.parametrize("python", DIST_PYTHONS)
def test_the_runtime_lock_covers_each_supported_python_within_pyprojects_ranges(python):
    selected = lockfile.select(lockfile.read(RUNTIME_LOCK), python)
    chosen = {lockfile.canonical(e.name): e for e in selected}
    assert len(chosen) == len(selected), f"two versions of one package for Python {python}"
    for requirement in runtime_requirements(python):
        name = lockfile.canonical(requirement.name)
        assert name in chosen, f"{requirement} is not locked for Python {python}: run `make lock`"
        assert requirement.specifier.contains(chosen[name].version, prereleases=True), \
            f"{name} {chosen[name].version} (locked for Python {python}) is outside pyproject's {requirement}"


def test_select_takes_markers_off_and_keeps_only_what_holds():
    entries = lockfile.read(RUNTIME_LOCK)
    for python in DIST_PYTHONS:
        env = lockfile.environment(python)
        chosen = lockfile.select(entries, python)
        assert [e for e in entries if e.marker is None or Marker(e.marker).evaluate(env)] == chosen
        for entry in chosen:
            text = entry.requirement()
            assert ";" not in text and text.startswith(f"{entry.name}=={entry.version} \\\n    --hash=sha256:")
    # tomli is Python < 3.11's TOML reader; nothing for Windows on any.
    assert "tomli" in {e.name for e in lockfile.select(entries, "3.9.2")}
    assert "tomli" not in {e.name for e in lockfile.select(entries, "3.11.2")}
    assert "colorama" not in {e.name for p in DIST_PYTHONS for e in lockfile.select(entries, p)}


def test_select_refuses_what_it_cannot_answer(tmp_path):
    with pytest.raises(lockfile.LockError, match="not locked for Python 3.11.2: nosuchpackage"):
        lockfile.select(lockfile.read(TEST_LOCK), "3.11.2", ["nosuchpackage"])
    with pytest.raises(lockfile.LockError, match="give a full version"):
        lockfile.environment("3.11")
    unhashed = tmp_path / "unhashed.lock"
    unhashed.write_text("click==8.1.8\n")
    with pytest.raises(lockfile.LockError, match=r"unhashed.lock:1: click has no --hash: run `make lock`"):
        lockfile.read(unhashed)
    ranged = tmp_path / "ranged.lock"
    ranged.write_text("# a comment\nclick>=8 \\\n    --hash=sha256:00\n")
    with pytest.raises(lockfile.LockError, match=r"ranged.lock:2: not a locked requirement"):
        lockfile.read(ranged)


def test_the_test_lock_holds_the_runtime_lock_s_versions():
    runtime = {(lockfile.canonical(e.name), e.version) for e in lockfile.select(lockfile.read(RUNTIME_LOCK), "3.11.2")}
    test = {(lockfile.canonical(e.name), e.version) for e in lockfile.select(lockfile.read(TEST_LOCK), "3.11.2")}
    assert runtime <= test


def test_the_venv_runs_the_locked_versions():
    """`make venv` installs the test lock; a venv that drifted from it tests something else."""
    python = ".".join(map(str, sys.version_info[:3]))
    for entry in lockfile.select(lockfile.read(TEST_LOCK), python):
        try:
            installed = version(entry.name)
        except PackageNotFoundError:
            pytest.fail(f"{entry.name} {entry.version} is locked but not installed: run `make venv`")
        assert installed == entry.version, f"{entry.name} {installed} installed, {entry.version} locked"


def test_compare_names_what_moved(tmp_path):
    entries = lockfile.read(TEST_LOCK)
    asyncssh = next(e for e in entries if e.name == "asyncssh")
    freeze = f"asyncssh=={asyncssh.version}\nCryptography==0.0.1\nnot-locked==1.0\n-e git+x#egg=y\n"
    assert lockfile.compare(entries, freeze) == [
        f"cryptography 0.0.1 (locked: {next(e.version for e in entries if e.name == 'cryptography')})",
        "not-locked 1.0 (not in the lock)"]


def test_the_script_runs_on_its_own():
    result = subprocess.run([sys.executable, str(REPO / "packaging" / "lockfile.py"), "select", str(RUNTIME_LOCK),
                             "--python", "3.9.2", "--only", "asyncssh"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"asyncssh==[0-9.]+ \\\n(    --hash=sha256:[0-9a-f]{64}( \\\n|\n))+", result.stdout)
    refused = subprocess.run([sys.executable, str(REPO / "packaging" / "lockfile.py"), "select", "/nonexistent",
                              "--python", "3.9.2"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("lockfile.py: [Errno 2]")
