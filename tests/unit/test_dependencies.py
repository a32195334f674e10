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
FLOORS = {"asyncssh": (2, 14, 2)}


def release(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def declared_floors() -> Dict[str, Tuple[int, ...]]:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {}
    for requirement in dependencies:
        found = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*(;.*)?", requirement)
        if found:
            floors[found.group(1).lower()] = release(found.group(2))
    return floors


def test_asyncssh_floor_excludes_releases_open_to_terrapin():
    floors = declared_floors()
    for name, minimum in FLOORS.items():
        assert name in floors, f"{name} has no >= floor in {PYPROJECT}"
        assert floors[name] >= minimum, f"{name}>={floors[name]} admits releases below {minimum}"


def test_the_installed_asyncssh_meets_the_floor():
    installed = release(re.match(r"[0-9.]+", version("asyncssh")).group(0).rstrip("."))
    assert installed >= declared_floors()["asyncssh"]
