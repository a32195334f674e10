"""A kernel security update on a server installed with the install script (tests/installer/kernel_update.py)."""

from __future__ import annotations

import re

import pytest

from . import kernel_update as scenario
from .kernel_update import client_key, kernels, known_hosts  # noqa: F401 (fixtures)
from .system import DebianSystem
from .test_install_script import INSTALL_TIMEOUT, SCRIPT, VERSION, build_dist

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, tmp_path_factory: pytest.TempPathFactory) -> DebianSystem:
    dist = build_dist(tmp_path_factory.mktemp("dist") / "mitigator-agent", VERSION)
    debian_system.put(dist, SCRIPT, mode=0o644)
    return debian_system


def test_the_server_runs_the_point_release_kernel(system, kernels):
    scenario.boot_the_point_release_kernel(system, kernels)


def test_the_install_brings_the_headers_metapackage(system, kernels, client_key, known_hosts):
    out = system.run(f"cat {SCRIPT} | sh", timeout=INSTALL_TIMEOUT).stderr
    assert f"mitigator-agent {VERSION} is installed and running" in out, out[-3000:]
    assert re.search(r"^\[#\] apt-get .* install .*\blinux-headers-amd64\b", out, re.M), out[:3000]
    assert system.run("dpkg-query -W -f='${Status}' linux-headers-amd64").stdout == "install ok installed"
    assert scenario.admit(system, client_key, known_hosts.parent) == known_hosts
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr


def test_the_security_update_builds_the_module_for_the_new_kernel(system, kernels):
    scenario.update_the_kernel(system, kernels, VERSION)


def test_after_the_reboot_the_agent_serves_right_cookies_with_the_same_host_key(system, kernels, client_key,
                                                                                 known_hosts):
    scenario.check_after_the_reboot(system, kernels["security"], client_key, known_hosts)


def test_a_kernel_dkms_cannot_build_for_is_loud_at_boot(system, kernels, client_key, known_hosts):
    scenario.check_loud_without_headers(system, kernels, client_key, known_hosts, VERSION)
