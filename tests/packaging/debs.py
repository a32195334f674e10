"""Build the Debian packages with ``packaging/build-deb.sh`` (what ``make deb`` runs).

Shared by the host-side package tests and the system tests that install the
packages in a booted Debian 12 image.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "packaging" / "build-deb.sh"
KMOD_VERSION_FILE = REPO / "kmod" / "VERSION"
PYTHONS_FILE = REPO / "packaging" / "pythons"


def supported_pythons() -> list[str]:
    """packaging/pythons: each supported release's python3, full version (3.9.2, ...), oldest first."""
    return [line.split()[0] for line in PYTHONS_FILE.read_text().splitlines() if line.split("#", 1)[0].strip()]


@dataclass(frozen=True)
class Debs:
    """The two packages of one build: VERSION-1 of each."""

    version: str
    dkms: Path
    agent: Path
    build_dir: Path

    @property
    def debian_version(self) -> str:
        return f"{self.version}-1"


def tree_version() -> str:
    """kmod/VERSION: the project's only version source."""
    return KMOD_VERSION_FILE.read_text().strip()


def build_debs(out_dir: Path, version: str = "", lintian: bool = False) -> Debs:
    """Run the build script into OUT_DIR/dist (staging in OUT_DIR/build).

    VERSION empty means kmod/VERSION. Raises CalledProcessError with the
    script's output when the build fails.
    """
    dist, build = out_dir / "dist", out_dir / "build"
    env = dict(os.environ, DEB_DIST_DIR=str(dist), DEB_BUILD_DIR=str(build),
               DEB_LINTIAN="yes" if lintian else "no")
    args = [str(BUILD_SCRIPT)] + ([version] if version else [])
    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, output=done.stdout)
    version = version or tree_version()
    return Debs(version=version,
                dkms=dist / f"tcpsecrets-dkms_{version}-1_all.deb",
                agent=dist / f"mitigator-agent_{version}-1_amd64.deb",
                build_dir=build)


def build_debs_for_test(tmp_path_factory: pytest.TempPathFactory, name: str = "debs", version: str = "") -> Debs:
    """build_debs() into a new temporary directory `name`; a failed build fails the test with its output."""
    try:
        return build_debs(tmp_path_factory.mktemp(name), version)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"packaging/build-deb.sh failed:\n{exc.output}")
