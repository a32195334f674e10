"""Debian release upgrades, 11 to 12 and 12 to 13, on a server installed with the Debian packages.

Each is done the documented way, in a system image of the older release: the sources moved to the
next release, `apt-get upgrade --without-new-pkgs`, then `apt-get full-upgrade`, and a reboot
onto the new release's kernel. The agent's package must survive the upgrade (one tree serves
python3 3.9 to 3.13: packaging/site-tree.py), DKMS must build the module for the new kernel
during it, python3's rtupdate hook must compile the agent's bytecode for the new python3, and
after the reboot the agent must serve on the new python3 with the same keys and host key, with
right cookies. About 40 minutes of TCG each: `make test-long`'s (marker `long`), one upgrade per
run (`-k bullseye`, `-k trixie`: tests/kernel/matrix.py's groups).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.packaging.debs import Debs, build_debs_for_test

from . import kernel_update as scenario
from .conftest import booted, usable
from .kernel_update import APT, INITRAMFS_DEP, client_key, known_hosts  # noqa: F401 (fixtures)
from .system import DebianSystem, SystemImage

pytestmark = [pytest.mark.long, pytest.mark.system]

INSTALL_TIMEOUT = 2400  # apt, the headers and a DKMS build of the module under TCG
UPGRADE_TIMEOUT = 5400  # the next release's packages, unpacked and configured under TCG
SITE = "/usr/lib/mitigator-agent/site-packages"


@dataclass(frozen=True)
class Upgrade:
    """One release upgrade: from, to, and what the new release runs."""

    old_suite: str
    old_release: str
    old_python: str
    new_suite: str
    new_release: str
    new_python: str
    new_kernel: str  # a regular expression for its `uname -r`

    def __str__(self) -> str:
        return f"{self.old_suite}-to-{self.new_suite}"


UPGRADES = [
    Upgrade("bullseye", "11", "3.9", "bookworm", "12", "3.11", r"6\.1\.0-\d+-amd64"),
    Upgrade("bookworm", "12", "3.11", "trixie", "13", "3.13", r"6\.12\.\d+\+deb13-amd64"),
]


@pytest.fixture(scope="module", params=UPGRADES, ids=str)
def upgrade(request: pytest.FixtureRequest) -> Upgrade:
    return request.param


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    return build_debs_for_test(tmp_path_factory)


@pytest.fixture(scope="module")
def system(upgrade: Upgrade, debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianSystem]:
    """The older release's image, booted, with the packages copied in."""
    with booted(usable(SystemImage.for_suite(upgrade.old_suite)), tmp_path_factory,
                f"release-upgrade-{upgrade}") as system:
        for deb in (debs.dkms, debs.agent):
            system.put(deb, f"/root/{deb.name}")
        yield system


def python_version(system: DebianSystem) -> str:
    return system.run("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.strip()


def newest_kernel(system: DebianSystem) -> str:
    return system.run("linux-version list | linux-version sort | tail -n 1").stdout.strip()


def test_installed_on_the_older_release_it_serves(system: DebianSystem, upgrade: Upgrade, debs: Debs,
                                                  client_key: Path, known_hosts: Path) -> None:
    assert system.run("cat /etc/debian_version").stdout.startswith(upgrade.old_release + ".")
    assert python_version(system) == upgrade.old_python
    system.run(f"{APT} update", timeout=900)
    system.run(f"{APT} install /root/{debs.dkms.name} /root/{debs.agent.name} 2>&1", timeout=INSTALL_TIMEOUT)
    assert system.run("systemctl is-active mitigator-agent").stdout.strip() == "active"
    assert scenario.admit(system, client_key, known_hosts.parent) == known_hosts
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr


def test_the_upgrade_keeps_the_agent_builds_the_module_and_compiles_for_the_new_python(
        system: DebianSystem, upgrade: Upgrade, debs: Debs) -> None:
    system.run(INITRAMFS_DEP)
    system.run(f"sed -i 's/{upgrade.old_suite}/{upgrade.new_suite}/g' /etc/apt/sources.list")
    system.run(f"{APT} update", timeout=900)
    system.run(f"{APT} upgrade --without-new-pkgs 2>&1", timeout=UPGRADE_TIMEOUT)
    out = system.run(f"{APT} full-upgrade 2>&1", timeout=UPGRADE_TIMEOUT).stdout
    assert system.run("cat /etc/debian_version").stdout.startswith(upgrade.new_release + "."), out[-3000:]
    for package in ("mitigator-agent", "tcpsecrets-dkms"):
        status = system.run(f"dpkg-query -W -f='${{Status}} ${{Version}}' {package}").stdout
        assert status == f"install ok installed {debs.debian_version}", (package, status, out[-3000:])
    kernel = newest_kernel(system)
    assert re.fullmatch(upgrade.new_kernel, kernel), kernel
    status = system.run(f"dkms status -m tcpsecrets -v {debs.version} -k {kernel}").stdout
    assert f"{kernel}, x86_64: installed" in status, status + out[-3000:]
    assert python_version(system) == upgrade.new_python
    compiled = system.run(f"ls {SITE}/mitigator_agent/__pycache__").stdout
    assert compiled.count(f".cpython-{upgrade.new_python.replace('.', '')}.pyc") > 5, compiled


def test_after_the_reboot_it_serves_on_the_new_python_with_the_same_keys(system: DebianSystem, upgrade: Upgrade,
                                                                        client_key: Path, known_hosts: Path) -> None:
    kernel = newest_kernel(system)
    scenario.check_after_the_reboot(system, kernel, client_key, known_hosts)
    assert system.run("uname -r").stdout.strip() == kernel
    pid = system.run("systemctl show -P MainPID mitigator-agent").stdout.strip()
    assert system.run(f"readlink /proc/{pid}/exe").stdout.strip() == f"/usr/bin/python{upgrade.new_python}"
    journal = system.run("journalctl -b -u mitigator-agent.service -p warning --no-pager -o cat").stdout
    assert "will-not-work" not in journal, journal
