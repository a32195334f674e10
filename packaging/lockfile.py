#!/usr/bin/env python3
"""Read the project's locks (agent/requirements.lock, tests/requirements.lock; `make lock`).

A lock is a pip requirements file that uv wrote: one entry per package, ``name==version``,
an environment marker where the entry holds for some Pythons only, and the ``--hash`` of every
file of that release.  pip installs from it as it is (``--require-hashes``), judging the markers
against the Python it runs on.  This tool answers what pip cannot:

    lockfile.py select LOCK --python 3.9.2 [--only NAME ...]
        The entries that hold for CPython 3.9.2 on x86_64 Linux, markers taken off, hashes kept:
        a requirements file for ``pip download --python-version 3.9.2``, which downloads for
        another Python but judges markers against its own (make-dist.sh).  --only: just those
        packages (build-deb.sh takes the build backend's pin from the test lock).
    lockfile.py compare LOCK FREEZE
        Which packages of ``pip freeze``'s output FREEZE are at other versions than LOCK says
        (make test-newest: what the next `make lock` would move).

Runs on the venv's Python and on a bare Debian python3 (the markers are evaluated with
``packaging``, or with pip's own copy of it where ``packaging`` is not installed).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.*?))?\s*$")


@dataclass(frozen=True)
class Entry:
    """One locked package: its name, version, marker (or None) and hashes, in the lock's order."""

    name: str
    version: str
    marker: Optional[str]
    hashes: tuple

    def requirement(self) -> str:
        """The entry without its marker, as pip reads it with --require-hashes."""
        lines = [f"{self.name}=={self.version}"] + [f"    --hash={h}" for h in self.hashes]
        return " \\\n".join(lines)


class LockError(Exception):
    """A lock that is not what `make lock` writes; the message names the file and line."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: Path) -> List[Entry]:
    """The entries of the lock at `path`; LockError for a line that is neither entry nor comment."""
    entries = []
    logical = ""
    first = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("--hash") else raw.strip()
        if not logical:
            first = number
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            entries.append(_entry(logical, path, first))
        logical = ""
    return entries


def _entry(text: str, path: Path, number: int) -> Entry:
    parts = text.split("--hash=")
    found = _ENTRY.match(parts[0].strip())
    if found is None:
        raise LockError(f"{path}:{number}: not a locked requirement (name==version [; marker]): "
                        f"{parts[0].strip()!r}")
    hashes = tuple(h.strip() for h in parts[1:])
    if not hashes:
        raise LockError(f"{path}:{number}: {found.group(1)} has no --hash: run `make lock`")
    return Entry(found.group(1), found.group(2), found.group(3) or None, hashes)


def _marker_class():
    try:
        from packaging.markers import Marker
    except ImportError:  # a bare Debian python3: pip's own copy
        from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    return Marker


def environment(python: str) -> Dict[str, str]:
    """The marker environment of CPython `python` (X.Y.Z) on x86_64 Linux."""
    if not re.fullmatch(r"\d+\.\d+\.\d+", python):
        raise LockError(f"--python {python!r}: give a full version, e.g. 3.9.2")
    return {
        "python_version": ".".join(python.split(".")[:2]),
        "python_full_version": python,
        "implementation_name": "cpython",
        "implementation_version": python,
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        "extra": "",
    }


def select(entries: Iterable[Entry], python: str, only: Iterable[str] = ()) -> List[Entry]:
    """The entries that hold for CPython `python` on x86_64 Linux (and are named in `only`, if given)."""
    wanted = {canonical(n) for n in only}
    env = environment(python)
    chosen = []
    for entry in entries:
        if wanted and canonical(entry.name) not in wanted:
            continue
        if entry.marker is None or _marker_class()(entry.marker).evaluate(env):
            chosen.append(entry)
    missing = wanted - {canonical(e.name) for e in chosen}
    if missing:
        raise LockError(f"not locked for Python {python}: {', '.join(sorted(missing))}")
    return chosen


def compare(entries: Iterable[Entry], freeze: str) -> List[str]:
    """One line per package `freeze` (pip freeze output) has at another version than the lock."""
    locked: Dict[str, set] = {}
    for entry in entries:
        locked.setdefault(canonical(entry.name), set()).add(entry.version)
    lines = []
    for line in freeze.splitlines():
        found = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip())
        if not found:
            continue
        name, version = canonical(found.group(1)), found.group(2)
        if name not in locked:
            lines.append(f"{name} {version} (not in the lock)")
        elif version not in locked[name]:
            lines.append(f"{name} {version} (locked: {', '.join(sorted(locked[name]))})")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lockfile.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="the entries for one CPython, markers taken off")
    s.add_argument("lock", type=Path)
    s.add_argument("--python", required=True, metavar="X.Y.Z")
    s.add_argument("--only", nargs="+", default=[], metavar="NAME")
    c = sub.add_parser("compare", help="pip freeze output against the lock")
    c.add_argument("lock", type=Path)
    c.add_argument("freeze", type=Path)
    args = parser.parse_args(argv)
    try:
        entries = read(args.lock)
        if args.command == "select":
            for entry in select(entries, args.python, args.only):
                print(entry.requirement())
            return 0
        moved = compare(entries, args.freeze.read_text())
    except (LockError, OSError) as e:
        print(f"lockfile.py: {e}", file=sys.stderr)
        return 2
    if moved:
        print(f"newer than {args.lock} (the next `make lock` moves these):")
        print("\n".join(f"  {line}" for line in moved))
    else:
        print(f"the newest releases are the ones {args.lock} holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
