"""A Debian release upgrade, 12 to 13, on a server installed with the Debian packages.

Done the documented way in a booted Debian 12 system: the packages installed
with apt and polled, then the apt sources moved to trixie, `apt upgrade
--without-new-pkgs` and `apt full-upgrade`, and a reboot onto trixie's
kernel. The upgrade must keep the agent's package (it carries wheels for
every supported python3, Debian 13's 3.13 among them), DKMS must build the
module for the new kernel, and after the reboot the agent serves on Python
3.13 with the same keys file and host key, and the kernel accepts the
cookies made from its answer.

About 35 minutes of TCG: `make test-long` runs it (marker `long`), not `make test`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from tests.packaging.debs import Debs, build_debs

from . import kernel_update as common
from .system import DebianSystem

pytestmark = pytest.mark.long

INSTALL_TIMEOUT = 2400  # apt, the headers and a DKMS build of the module under TCG
UPGRADE_TIMEOUT = 7200  # a whole release under TCG
KEPT = ("/opt/mitigator_agent/keys", "/opt/mitigator_agent/host.ed25519", "/opt/mitigator_agent/host.ed25519.pub")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    try:
        return build_debs(tmp_path_factory.mktemp("debs"))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"packaging/build-deb.sh failed:\n{exc.output}")


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, debs: Debs) -> DebianSystem:
    for deb in (debs.dkms, debs.agent):
        debian_system.put(deb, f"/root/{deb.name}")
    return debian_system


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator1", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """What one step records for the next: MITIGATOR's known_hosts, the kept files, the new kernel."""
    return {"known_hosts": tmp_path_factory.mktemp("pins") / "known_hosts"}


def test_installed_on_debian_12_and_polled(system, debs, client_key, seen):
    system.run(f"{common.APT} update", timeout=900)
    system.run(f"{common.APT} install /root/{debs.dkms.name} /root/{debs.agent.name} 2>&1", timeout=INSTALL_TIMEOUT)
    assert common.admit(system, client_key, seen["known_hosts"].parent) == seen["known_hosts"]
    result = common.get(system, client_key, seen["known_hosts"])
    assert result.returncode == 0, result.stderr
    seen["kept"] = {path: system.get(path) for path in KEPT}
    assert system.run("python3 -c 'import sys; print(sys.version_info[:2])'").stdout.strip() == "(3, 11)"


def test_the_upgrade_to_debian_13_keeps_the_agent_and_builds_the_module(system, debs, seen):
    system.run(common.INITRAMFS_DEP)
    system.run("sed -i 's/bookworm/trixie/g' /etc/apt/sources.list && apt-get -q update", timeout=900)
    system.run(f"{common.APT} upgrade --without-new-pkgs 2>&1", timeout=UPGRADE_TIMEOUT)
    upgrade = system.run(f"{common.APT} full-upgrade 2>&1", timeout=UPGRADE_TIMEOUT).stdout
    assert system.run("dpkg-query -W -f='${Status} ${Version}' mitigator-agent").stdout == \
        f"install ok installed {debs.debian_version}", upgrade[-3000:]
    assert system.run(". /etc/os-release && echo $VERSION_ID").stdout.strip() == "13"
    newest = system.run("linux-version list | linux-version sort | tail -n 1").stdout.strip()
    assert newest.startswith("6.12."), newest
    status = system.run(f"dkms status -m tcpsecrets -v {debs.version} -k {newest}").stdout
    assert re.search(rf", {re.escape(newest)}, x86_64: installed", status), status + upgrade[-3000:]
    seen["kernel"] = newest


def test_after_the_reboot_the_agent_serves_on_python_3_13_with_the_same_keys(system, debs, client_key, seen):
    system.reboot_onto(str(seen["kernel"]))
    assert system.run("python3 -c 'import sys; print(sys.version_info[:2])'").stdout.strip() == "(3, 13)"
    assert system.run("mitigator-agent --version").stdout.strip() == f"mitigator-agent, version {debs.version}"
    gid = system.run("getent group mitigator_agent | cut -d: -f3").stdout.strip()
    assert system.run("cat /sys/module/tcpsecrets/parameters/read_gid").stdout.strip() == gid
    assert {path: system.get(path) for path in KEPT} == seen["kept"]
    result = common.get(system, client_key, seen["known_hosts"])
    assert result.returncode == 0, result.stderr
    answer = common.fields(result.stdout, ": ")
    proc = common.fields(system.run("cat /proc/tcp_secrets").stdout, " ")
    assert answer["net_secret"] == proc["net_secret"]
    selftest = system.run("mitigator-agent selftest", check=False)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
