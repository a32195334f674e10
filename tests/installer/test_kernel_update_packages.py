"""A kernel security update on a server installed with the Debian packages (tests/installer/kernel_update.py)."""

from __future__ import annotations

import pytest

from tests.packaging.debs import Debs, build_debs_for_test

from . import kernel_update as scenario
from .kernel_update import client_key, kernels, known_hosts  # noqa: F401 (fixtures)
from .system import DebianSystem

pytestmark = pytest.mark.long

INSTALL_TIMEOUT = 2400  # apt, the headers and a DKMS build of the module under TCG


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    return build_debs_for_test(tmp_path_factory)


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, debs: Debs) -> DebianSystem:
    for deb in (debs.dkms, debs.agent):
        debian_system.put(deb, f"/root/{deb.name}")
    return debian_system


def test_the_server_runs_the_point_release_kernel(system, kernels):
    scenario.boot_the_point_release_kernel(system, kernels)


def test_the_install_brings_the_headers_metapackage(system, debs, kernels, client_key, known_hosts):
    # as an admin installs them: apt, with the recommended packages (the default)
    out = system.run(f"{scenario.APT} install /root/{debs.dkms.name} /root/{debs.agent.name} 2>&1",
                     timeout=INSTALL_TIMEOUT).stdout
    assert system.run("dpkg-query -W -f='${Status}' linux-headers-amd64").stdout == "install ok installed", out
    assert system.run("systemctl is-active mitigator-agent").stdout.strip() == "active"
    assert scenario.admit(system, client_key, known_hosts.parent) == known_hosts
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr


def test_the_security_update_builds_the_module_for_the_new_kernel(system, debs, kernels):
    scenario.update_the_kernel(system, kernels, debs.version)


def test_after_the_reboot_the_agent_serves_right_cookies_with_the_same_host_key(system, kernels, client_key,
                                                                                 known_hosts):
    scenario.check_after_the_reboot(system, kernels["security"], client_key, known_hosts)


def test_a_kernel_dkms_cannot_build_for_is_loud_at_boot(system, debs, kernels, client_key, known_hosts):
    scenario.check_loud_without_headers(system, kernels, client_key, known_hosts, debs.version)
