"""Dependency floors admit no release with a known vulnerability of ours to care about."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Dict, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11's Python 3.9
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# asyncssh 2.14.2 fixed Terrapin (CVE-2023-48795, prefix truncation of the
# handshake); 2.14.1 the rogue session attacks (CVE-2023-46445/46446).
# cryptography's PyPI wheels link OpenSSL statically; every release before
# 48.0.1 carries a vulnerable one (GHSA-537c-gmf6-5ccf, July 2026; earlier:
# 42.0.0-44.0.0 CVE-2024-12797, 37.0.0-43.0.0 the 2024-09-03 advisory).
FLOORS = {"asyncssh": (2, 14, 2), "cryptography": (48, 0, 1)}


def release(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def declared_floors() -> Dict[str, Tuple[int, ...]]:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {}
    for requirement in dependencies:
        found = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*(,\s*<\s*[0-9.]+\s*)?(;.*)?", requirement)
        if found:
            floors[found.group(1).lower()] = release(found.group(2))
    return floors


def test_floors_exclude_releases_with_known_vulnerabilities():
    floors = declared_floors()
    for name, minimum in FLOORS.items():
        assert name in floors, f"{name} has no >= floor in {PYPROJECT}"
        assert floors[name] >= minimum, f"{name}>={floors[name]} admits releases below {minimum}"


def test_the_installed_releases_meet_the_floors():
    for name in FLOORS:
        installed = release(re.match(r"[0-9.]+", version(name)).group(0).rstrip("."))
        assert installed >= declared_floors()[name], f"{name} {version(name)} is below its floor"
