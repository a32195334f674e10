#!/usr/bin/env python3
"""Lay out the Debian package's Python tree: one tree that runs on every supported python3.

A server's python3 changes minor version with a Debian release upgrade (3.11 on Debian 12, 3.13
on Debian 13), and the package must keep serving across it.  The lock pins, per Python, the
releases that hold for it (agent/requirements.lock); most are the same for every Python, a few
differ (asyncssh and cffi dropped 3.9, pycparser 3.10), and some wheels are built per CPython
(cffi, siphash24).  From the wheels pip downloaded for each supported Python
(WHEELS/X.Y/*.whl, packaging/build-deb.sh), this lays out under LIBDIR:

    site-packages/        every package at the version the newest supported Python takes, each
                          from the wheel of the oldest Python taking that version (an abi3 or pure
                          wheel serves the newer ones too), plus, for a wheel built per CPython,
                          the other CPythons' extension modules beside it: ABI-tagged file names
                          (``_cffi_backend.cpython-313-x86_64-linux-gnu.so``) never collide
    site-packages-X.Y/    for a Python whose lock entries differ: those packages at its versions,
                          ahead of site-packages/ on its sys.path (the launcher)
    pythons               the X.Y this tree serves, one a line: the launcher refuses another

    site-tree.py plan WHEELS                     print the layout
    site-tree.py install WHEELS LIBDIR AGENT_WHEEL
                                                 lay it out (pip install --target, no index)

Fails, naming the wheel, where a layout cannot serve a Python: a wheel that is neither pure,
abi3 nor built for its Python, or extension-module siblings whose pure-Python parts differ.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class SiteTreeError(Exception):
    """A set of wheels that cannot make one tree for every Python; the message says which and why."""


@dataclass(frozen=True)
class Wheel:
    """A wheel file, by its name's fields (PEP 427)."""

    path: Path
    name: str
    version: str
    python_tag: str
    abi: str

    @classmethod
    def of(cls, path: Path) -> "Wheel":
        parts = path.name[:-len(".whl")].split("-")
        if not path.name.endswith(".whl") or len(parts) not in (5, 6):
            raise SiteTreeError(f"{path}: not a wheel file name (NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl)")
        return cls(path, parts[0].lower().replace("_", "-"), parts[1], parts[-3], parts[-2])

    def built_for(self, python: str) -> bool:
        """Built for this CPython only (an extension module with its version-specific ABI)."""
        return self.abi == cpython_abi(python)


def cpython_abi(python: str) -> str:
    """'3.11' -> 'cp311'."""
    return "cp" + python.replace(".", "")


def version_key(python: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in python.split("."))


@dataclass
class Layout:
    """Which wheel goes where (see the module's docstring)."""

    pythons: List[str]
    base: Dict[str, Tuple[str, Wheel]] = field(default_factory=dict)  # package -> (Python it came for, wheel)
    siblings: List[Tuple[str, Wheel]] = field(default_factory=list)  # (Python, wheel) whose modules join base
    overlays: Dict[str, List[Wheel]] = field(default_factory=dict)  # Python -> its own versions

    def describe(self) -> str:
        lines = [f"pythons: {' '.join(self.pythons)}", "site-packages/:"]
        for name, (python, wheel) in sorted(self.base.items()):
            lines.append(f"  {name} {wheel.version} ({wheel.path.name}, for {python})")
        for python, wheel in self.siblings:
            lines.append(f"  + the {python} extension modules of {wheel.path.name}")
        for python, wheels in sorted(self.overlays.items(), key=lambda item: version_key(item[0])):
            lines.append(f"site-packages-{python}/:")
            lines.extend(f"  {w.name} {w.version} ({w.path.name})" for w in wheels)
        return "\n".join(lines)


def read_wheels(root: Path) -> Dict[str, Dict[str, Wheel]]:
    """WHEELS/X.Y/*.whl: per Python, its wheels by package name."""
    chosen: Dict[str, Dict[str, Wheel]] = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        python = directory.name
        if not all(part.isdigit() for part in python.split(".")):
            raise SiteTreeError(f"{directory}: expected one directory per Python, named X.Y")
        wheels: Dict[str, Wheel] = {}
        for path in sorted(directory.glob("*.whl")):
            wheel = Wheel.of(path)
            if wheel.name in wheels:
                raise SiteTreeError(f"{directory}: two wheels of {wheel.name} ({wheels[wheel.name].path.name},"
                                    f" {path.name}): download one Python's wheels per directory")
            wheels[wheel.name] = wheel
        if not wheels:
            raise SiteTreeError(f"{directory}: no wheels")
        chosen[python] = wheels
    if not chosen:
        raise SiteTreeError(f"{root}: no per-Python wheel directories")
    return chosen


def plan(chosen: Dict[str, Dict[str, Wheel]]) -> Layout:
    """The layout serving every Python of `chosen` (see the module's docstring)."""
    pythons = sorted(chosen, key=version_key)
    newest = chosen[pythons[-1]]
    layout = Layout(pythons)
    names = sorted({name for wheels in chosen.values() for name in wheels})
    for name in names:
        base_version = newest[name].version if name in newest else None
        for python in pythons:
            wheel = chosen[python].get(name)
            if wheel is None:
                continue
            if wheel.abi not in ("abi3", "none") and not wheel.built_for(python):
                raise SiteTreeError(f"{wheel.path.name}: built for ABI {wheel.abi}, which Python {python}"
                                    f" cannot load: download each Python's wheels into its own directory")
            if wheel.version != base_version:
                layout.overlays.setdefault(python, []).append(wheel)
            elif name not in layout.base:
                layout.base[name] = (python, wheel)
            elif wheel.built_for(python) and wheel.path.name != layout.base[name][1].path.name:
                layout.siblings.append((python, wheel))
            # else: the same wheel, or an abi3 or pure one, whose older Python's wheel serves this one too
    for python in pythons:
        for name, wheel in chosen[python].items():
            if name in layout.base and wheel.version == layout.base[name][1].version \
                    and not _serves(layout, python, name):
                raise SiteTreeError(f"{layout.base[name][1].path.name} cannot serve Python {python} and no wheel"
                                    f" of {name} {layout.base[name][1].version} built for it was downloaded")
    return layout


def _serves(layout: Layout, python: str, name: str) -> bool:
    """Whether site-packages/ holds a `name` that Python `python` can import."""
    came_for, wheel = layout.base[name]
    if wheel.abi == "none" or came_for == python:
        return True
    if wheel.abi == "abi3":  # the stable ABI of its python tag (cp39) and every newer CPython
        return version_key(python) >= version_key(wheel.python_tag[2:3] + "." + wheel.python_tag[3:])
    return any(sibling_python == python and sibling.name == name for sibling_python, sibling in layout.siblings)


def _pip_install(target: Path, python: str, wheels: Sequence[Path]) -> None:
    """pip installs `wheels` into `target` as for CPython `python`, offline, without bytecode."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
               "--disable-pip-version-check", "--no-warn-script-location", "--only-binary=:all:",
               "--target", str(target), "--python-version", python, "--implementation", "cp",
               "--abi", cpython_abi(python), "--abi", "abi3", "--abi", "none", *platforms,
               *map(str, wheels)]
    subprocess.run(command, check=True)


def _add_siblings(site: Path, python: str, wheel: Wheel) -> List[str]:
    """Unpack this Python's extension modules (and libraries they bring) from `wheel` into `site`; its
    other files must be the very bytes already there. The files added."""
    tag = f".cpython-{python.replace('.', '')}-"
    added = []
    with zipfile.ZipFile(wheel.path) as archive:
        for member in archive.infolist():
            if member.is_dir() or ".dist-info/" in member.filename:
                continue
            destination = site / member.filename
            data = archive.read(member)
            top = member.filename.split("/", 1)[0]
            if tag in Path(member.filename).name or (top.endswith(".libs") and not destination.exists()):
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
                destination.chmod(0o755 if member.filename.endswith(".so") or ".so." in member.filename else 0o644)
                added.append(member.filename)
            elif not destination.exists() or destination.read_bytes() != data:
                raise SiteTreeError(f"{wheel.path.name}: {member.filename} differs from the same release's wheel"
                                    f" for another Python: the tree cannot hold both")
    if not added:
        raise SiteTreeError(f"{wheel.path.name}: no extension module for Python {python} in it")
    return added


def install(chosen: Dict[str, Dict[str, Wheel]], libdir: Path, agent_wheel: Path) -> Layout:
    """Lay the tree out under `libdir` (site-packages/, site-packages-X.Y/, pythons)."""
    layout = plan(chosen)
    site = libdir / "site-packages"
    by_python: Dict[str, List[Path]] = {}
    for python, wheel in layout.base.values():
        by_python.setdefault(python, []).append(wheel.path)
    # the agent is pure Python: installed as for the oldest, like everything it imports
    by_python.setdefault(layout.pythons[0], []).append(agent_wheel)
    for python, wheels in sorted(by_python.items(), key=lambda item: version_key(item[0])):
        _pip_install(site, python, wheels)
    for python, wheel in layout.siblings:
        _add_siblings(site, python, wheel)
    for python, wheels in layout.overlays.items():
        _pip_install(libdir / f"site-packages-{python}", python, [w.path for w in wheels])
    (libdir / "pythons").write_text("".join(f"{python}\n" for python in layout.pythons))
    return layout


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    parser = argparse.ArgumentParser(prog="site-tree.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("plan", help="print the layout")
    show.add_argument("wheels", type=Path)
    lay = commands.add_parser("install", help="lay the tree out")
    lay.add_argument("wheels", type=Path)
    lay.add_argument("libdir", type=Path)
    lay.add_argument("agent_wheel", type=Path)
    args = parser.parse_args(argv)
    try:
        chosen = read_wheels(args.wheels)
        layout = plan(chosen) if args.command == "plan" else install(chosen, args.libdir, args.agent_wheel)
    except SiteTreeError as error:
        print(f"site-tree: {error}", file=sys.stderr)
        return 1
    print(layout.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
