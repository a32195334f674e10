"""packaging/site-tree.py: one Python tree for every supported python3 (the Debian package's)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("site_tree", REPO / "packaging" / "site-tree.py")
site_tree = importlib.util.module_from_spec(_spec)
sys.modules["site_tree"] = site_tree  # its dataclasses look their module up
_spec.loader.exec_module(site_tree)  # type: ignore[union-attr]

MANYLINUX = "manylinux2014_x86_64"


def chosen(per_python: Dict[str, List[str]]) -> Dict[str, Dict[str, "site_tree.Wheel"]]:
    """What pip downloaded for each Python, by file name (plan() reads the names only)."""
    return {python: {w.name: w for w in (site_tree.Wheel.of(Path(python) / name) for name in names)}
            for python, names in per_python.items()}


# The shape of agent/requirements.lock: versions that differ for 3.9 (and 3.10), per-CPython builds,
# an abi3 wheel per range of Pythons, a package only old Pythons need.
LOCK_SHAPED = chosen({
    "3.9": ["asyncssh-2.21.1-py3-none-any.whl", f"cffi-2.0.0-cp39-cp39-{MANYLINUX}.whl",
            f"cryptography-51.0.1-cp39-abi3-{MANYLINUX}.whl", f"siphash24-1.9-cp39-cp39-{MANYLINUX}.whl",
            "tomli-2.5.0-py3-none-any.whl"],
    "3.10": ["asyncssh-2.24.1-py3-none-any.whl", f"cffi-2.1.1-cp310-cp310-{MANYLINUX}.whl",
             f"cryptography-51.0.1-cp39-abi3-{MANYLINUX}.whl", f"siphash24-1.9-cp310-cp310-{MANYLINUX}.whl",
             "tomli-2.5.0-py3-none-any.whl"],
    "3.11": ["asyncssh-2.24.1-py3-none-any.whl", f"cffi-2.1.1-cp311-cp311-{MANYLINUX}.whl",
             f"cryptography-51.0.1-cp311-abi3-{MANYLINUX}.whl", f"siphash24-1.9-cp311-cp311-{MANYLINUX}.whl"],
    "3.13": ["asyncssh-2.24.1-py3-none-any.whl", f"cffi-2.1.1-cp313-cp313-{MANYLINUX}.whl",
             f"cryptography-51.0.1-cp311-abi3-{MANYLINUX}.whl", f"siphash24-1.9-cp313-cp313-{MANYLINUX}.whl"],
})


def test_the_newest_pythons_versions_make_the_tree_and_the_others_get_their_own():
    layout = site_tree.plan(LOCK_SHAPED)
    assert layout.pythons == ["3.9", "3.10", "3.11", "3.13"]
    base = {name: (python, wheel.path.name) for name, (python, wheel) in layout.base.items()}
    assert base == {
        "asyncssh": ("3.10", "asyncssh-2.24.1-py3-none-any.whl"),
        "cffi": ("3.10", f"cffi-2.1.1-cp310-cp310-{MANYLINUX}.whl"),
        # the oldest Python's abi3 wheel serves the newer ones: no second copy
        "cryptography": ("3.9", f"cryptography-51.0.1-cp39-abi3-{MANYLINUX}.whl"),
        "siphash24": ("3.9", f"siphash24-1.9-cp39-cp39-{MANYLINUX}.whl"),
    }
    assert [(python, wheel.name) for python, wheel in layout.siblings] == [
        ("3.11", "cffi"), ("3.13", "cffi"), ("3.10", "siphash24"), ("3.11", "siphash24"), ("3.13", "siphash24")]
    overlays = {python: sorted(w.path.name for w in wheels) for python, wheels in layout.overlays.items()}
    assert overlays == {
        "3.9": ["asyncssh-2.21.1-py3-none-any.whl", f"cffi-2.0.0-cp39-cp39-{MANYLINUX}.whl",
                "tomli-2.5.0-py3-none-any.whl"],
        "3.10": ["tomli-2.5.0-py3-none-any.whl"],
    }
    assert "site-packages-3.9/:" in layout.describe()


def test_a_wheel_built_for_another_python_is_refused_with_its_name():
    wrong = chosen({"3.11": [f"cffi-2.1.1-cp310-cp310-{MANYLINUX}.whl"]})
    with pytest.raises(site_tree.SiteTreeError, match=r"cffi-2\.1\.1-cp310.*cannot load"):
        site_tree.plan(wrong)


def test_a_per_cpython_build_that_an_abi3_wheel_follows_is_refused():
    # 3.11's abi3 wheel is not in the tree, and 3.10's build cannot serve 3.11
    mixed = chosen({"3.10": [f"x-1.0-cp310-cp310-{MANYLINUX}.whl"], "3.11": [f"x-1.0-cp311-abi3-{MANYLINUX}.whl"]})
    with pytest.raises(site_tree.SiteTreeError, match=r"cannot serve Python 3\.11"):
        site_tree.plan(mixed)


def test_an_abi3_wheel_serves_no_python_older_than_its_tag():
    layout = site_tree.plan(chosen({"3.11": [f"x-1.0-cp311-abi3-{MANYLINUX}.whl"]}))
    assert site_tree._serves(layout, "3.11", "x") and not site_tree._serves(layout, "3.10", "x")


def wheel_file(directory: Path, name: str, members: Dict[str, bytes]) -> "site_tree.Wheel":
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return site_tree.Wheel.of(path)


def test_siblings_add_their_pythons_modules_and_nothing_else(tmp_path: Path):
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg/__init__.py").write_bytes(b"same\n")
    (site / "pkg/core.cpython-310-x86_64-linux-gnu.so").write_bytes(b"310")
    wheel = wheel_file(tmp_path / "3.11", f"pkg-1.0-cp311-cp311-{MANYLINUX}.whl", {
        "pkg/__init__.py": b"same\n", "pkg/core.cpython-311-x86_64-linux-gnu.so": b"311",
        "pkg.libs/libffi-1234.so.8": b"lib", "pkg-1.0.dist-info/RECORD": b"other record"})
    added = site_tree._add_siblings(site, "3.11", wheel)
    assert sorted(added) == ["pkg.libs/libffi-1234.so.8", "pkg/core.cpython-311-x86_64-linux-gnu.so"]
    assert (site / "pkg/core.cpython-310-x86_64-linux-gnu.so").read_bytes() == b"310"
    assert (site / "pkg/core.cpython-311-x86_64-linux-gnu.so").read_bytes() == b"311"
    assert not (site / "pkg-1.0.dist-info").exists()


def test_siblings_whose_python_code_differs_are_refused(tmp_path: Path):
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg/__init__.py").write_bytes(b"for 3.10\n")
    wheel = wheel_file(tmp_path / "3.11", f"pkg-1.0-cp311-cp311-{MANYLINUX}.whl", {
        "pkg/__init__.py": b"for 3.11\n", "pkg/core.cpython-311-x86_64-linux-gnu.so": b"311"})
    with pytest.raises(site_tree.SiteTreeError, match=r"pkg/__init__\.py differs"):
        site_tree._add_siblings(site, "3.11", wheel)


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "3.11").mkdir()
    (tmp_path / "3.11" / f"cffi-2.1.1-cp310-cp310-{MANYLINUX}.whl").write_bytes(b"")
    assert site_tree.main(["plan", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("site-tree: cffi-2.1.1-cp310") and err.count("\n") == 1
