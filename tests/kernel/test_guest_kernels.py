"""Boot each test kernel once, run tests/kernel/guest/ inside it, report each guest test here.

One boot per kernel (TCG is slow): the guest suite runs under pytest in the
guest and writes a JUnit report to a writable shared directory; every guest
test then appears below as its own host test, passed or failed with the
guest's message. The guest loads the module DKMS built for that kernel in a
chroot of its release (build/matrix/KVER/tcpsecrets.ko, tests/kernel/matrix.py);
the outcomes, the guest's console and its dmesg after the suite are kept
beside it (guest.json, guest.log, dmesg.txt) for the matrix's results table.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from . import matrix, vm

pytestmark = pytest.mark.kernel

GUEST_DIR = Path(__file__).parent / "guest"
KVERS = vm.test_kvers()


def _guest_test_ids() -> list[str]:
    """`file::name` of every test function in guest/, read without importing."""
    ids = []
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                ids.append(f"{path.stem}::{node.name}")
    return ids


GUEST_TESTS = _guest_test_ids()


@pytest.fixture(scope="session")
def guest_reports(tmp_path_factory):
    """kver -> {test id -> (outcome, detail)}, booting each kernel at most once."""
    ok, why = vm.can_boot()
    if not ok:
        pytest.skip(why)
    cache: dict[str, dict[str, tuple[str, str]]] = {}
    failed: dict[str, str] = {}

    def report(kver: str) -> dict[str, tuple[str, str]]:
        if kver in failed:  # no second boot (or build) for the next guest test
            pytest.fail(failed[kver], pytrace=False)
        if kver not in cache:
            try:
                cache[kver] = _run_guest_suite(kver, tmp_path_factory.mktemp(f"guest-{kver}"))
            except pytest.fail.Exception as e:
                failed[kver] = str(e)
                raise
        return cache[kver]

    return report


def _run_guest_suite(kver: str, work: Path) -> dict[str, tuple[str, str]]:
    if not vm.kernel_image(kver).exists():
        pytest.fail(f"kernel {kver} is not provisioned: run tests/provision-host.sh")
    try:
        ko = vm.build_module(kver)
    except matrix.BuildFailed as e:
        pytest.fail(str(e))
    keep = matrix.out_dir(kver)
    for stale in ("guest.json", "guest.log", "dmesg.txt"):
        (keep / stale).unlink(missing_ok=True)
    out = work / "out"
    out.mkdir()
    junit = out / "junit.xml"
    dmesg = out / "dmesg.txt"
    try:
        result = vm.run_in_guest(
            kver,
            f"{sys.executable} -m pytest -p no:cacheprovider -o addopts= -v --durations=15 {GUEST_DIR} "
            f"--junitxml={junit}; rc=$?; dmesg > {dmesg}; exit $rc",
            rwdirs=[out],
            env={**vm.guest_env(kver, ko), "TCPSECRETS_GUEST_OUT": str(out)},
        )
    except subprocess.TimeoutExpired as e:
        output = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout) or ""
        (keep / "guest.log").write_text(output)  # -v: its last line names the test that hung
        pytest.fail(f"guest run on {kver} timed out after {e.timeout} s:\n" + output[-6000:])
    (work / "guest.log").write_text(result.stdout)
    shutil.copyfile(work / "guest.log", keep / "guest.log")
    if dmesg.exists():
        shutil.copyfile(dmesg, keep / "dmesg.txt")
    if not junit.exists():
        pytest.fail(f"guest run on {kver} produced no report (exit {result.returncode}):\n"
                    + result.stdout[-6000:])
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "").split("[", 1)[0]
        key = f"{module}::{name}"
        detail = ""
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                detail += (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                outcome = "skipped" if outcome == "passed" else outcome
                detail += child.get("message") or ""
        previous = outcomes.get(key)
        if previous is None or previous[0] == "passed":  # keep the worst of parametrized cases
            outcomes[key] = (outcome, detail)
    (keep / "guest.json").write_text(json.dumps(outcomes, indent=1) + "\n")
    return outcomes


@pytest.mark.parametrize("kver", KVERS)
@pytest.mark.parametrize("test_id", GUEST_TESTS)
def test_in_guest(guest_reports, kver: str, test_id: str) -> None:
    outcomes = guest_reports(kver)
    assert test_id in outcomes, f"{test_id} did not run in the {kver} guest"
    outcome, detail = outcomes[test_id]
    assert outcome == "passed", f"{test_id} {outcome} in the {kver} guest:\n{detail}"
