"""The steps of the kernel security update scenario, shared by its two install paths.

A server installed while bookworm's point-release kernel was current (the
security archive's kernels out of reach, as before they were published),
then `apt-get dist-upgrade` with bookworm-security as an admin runs it, then a
reboot onto the new kernel ABI: the module must be there with its options,
the agent must serve with the same host key, and the cookies must be right,
without the admin doing anything for the module. Then the case where DKMS
cannot build (the new kernel's headers gone): the agent says so at boot,
naming the kernel and the fix, `check` fails, and MITIGATOR's `get` gets
exit 2.

Bookworm's point-release kernel (6.1.0-50, 6.1.176) has ts_secret and its
security update (6.1.0-57, 6.1.192) has not: the update also moves the
module to its other code path.

tests/installer/test_kernel_update_script.py runs these steps with the whole
`apt-get dist-upgrade` (about 25 minutes of TCG: `make test-long`'s, marker
`long`); tests/installer/test_server_life.py runs them in `make test` with the
update's kernel packages only (KERNEL_UPDATE).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from .system import DebianSystem

# The security update's kernel packages are out of reach until the update: the server was installed
# when the point release's kernel was the newest one. (Pinned by version: the point release's
# packages are in bookworm-security too, so a pin by release would hide them as well.)
PIN_FILE = "/etc/apt/preferences.d/before-the-security-update"
PIN = "Package: linux-*\nPin: version {version}\nPin-Priority: -1\n"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Options::=--force-confold -o Dpkg::Use-Pty=0"
# Each kernel these scenarios install makes an initramfs; with Debian's default (MODULES=most: every
# storage and network driver) that takes over 8 minutes under TCG. This machine's own drivers will do.
INITRAMFS_DEP = "sed -i 's/^MODULES=.*/MODULES=dep/' /etc/initramfs-tools/initramfs.conf"
HOST_KEY = "/opt/mitigator_agent/host.ed25519"
KEYS = "/opt/mitigator_agent/keys"
WAIT_FOR_PORT = "for i in $(seq 120); do ss -Hltn 'sport = :7100' | grep -q . && exit 0; sleep 1; done; exit 1"


def fields(text: str, separator: str) -> Dict[str, str]:
    return dict(line.split(separator, 1) for line in text.strip().splitlines())


def find_kernels(system: DebianSystem) -> Dict[str, str]:
    """The ABIs of bookworm's point-release kernel ("point") and of bookworm-security's ("security"), and
    their linux-image-amd64 versions ("point_version", "security_version"), as the guest's apt lists them."""
    def abi_of(version: str) -> str:
        depends = system.run(f"apt-cache depends linux-image-amd64={shlex.quote(version)}").stdout
        found = re.search(r"Depends: linux-image-(\S+)", depends)
        assert found, depends
        return found.group(1)

    system.run("apt-get -q update", timeout=900)
    madison = system.run("apt-cache madison linux-image-amd64").stdout
    point = next(line.split("|")[1].strip() for line in madison.splitlines()
                 if "bookworm/main" in line and "security" not in line)
    security = next(line.split("|")[1].strip() for line in madison.splitlines() if "bookworm-security" in line)
    found = {"point": abi_of(point), "security": abi_of(security), "point_version": point,
             "security_version": security}
    assert found["point"] != found["security"], madison
    return found


def boot_the_point_release_kernel(system: DebianSystem, found: Dict[str, str]) -> None:
    """The server as it was before the update: the point release's kernel, no newer one installed."""
    system.run(INITRAMFS_DEP)
    system.put(PIN.format(version=found["security_version"]).encode(), PIN_FILE)
    system.run(f"{APT} install --no-install-recommends --allow-downgrades linux-image-amd64={found['point_version']}",
               timeout=1800)
    system.reboot_onto(found["point"])
    system.run(f"{APT} purge linux-image-{found['security']}", timeout=900)
    assert system.run("ls /boot").stdout.count("vmlinuz-") == 1


def admit(system: DebianSystem, client_key: Path, pins: Path) -> Path:
    """Add MITIGATOR's key to the keys file and pin the agent's host key; the known_hosts file."""
    public = client_key.with_suffix(".pub").read_text().strip()
    system.run(f"echo {shlex.quote(public)} >> {KEYS}")
    host_key = system.get(HOST_KEY + ".pub").decode().split()
    known_hosts = pins / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{system.agent_port} {host_key[0]} {host_key[1]}\n")
    return known_hosts


def get(system: DebianSystem, client_key: Path, known_hosts: Path) -> subprocess.CompletedProcess[str]:
    """MITIGATOR's `get` with OpenSSH, the host key pinned."""
    system.run(WAIT_FOR_PORT)
    return subprocess.run(
        ["ssh", "-F", "none", "-i", str(client_key), "-p", str(system.agent_port), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "ConnectTimeout=60", "mitigator_agent@127.0.0.1", "get"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


# The whole security update (`make test-long`), and its kernel alone: the packages of the update that
# bring a new kernel ABI (`make test`: the rest of the update does not concern the module, and takes
# 20 minutes of TCG).
WHOLE_UPDATE = "dist-upgrade"
KERNEL_UPDATE = "install --only-upgrade linux-image-amd64 linux-headers-amd64"


def update_the_kernel(system: DebianSystem, found: Dict[str, str], module_version: str,
                      apt_command: str = WHOLE_UPDATE) -> str:
    """The security update as an admin runs it; DKMS must have built the module for the new kernel."""
    security = found["security"]
    system.run(f"rm {PIN_FILE} && apt-get -q update", timeout=900)
    upgrade = system.run(f"{APT} {apt_command} 2>&1", timeout=3600).stdout
    assert f"linux-headers-{security}" in upgrade and f"linux-image-{security}" in upgrade, upgrade[-3000:]
    status = system.run(f"dkms status -m tcpsecrets -v {module_version} -k {security}").stdout
    assert re.search(rf"tcpsecrets/{re.escape(module_version)}, {re.escape(security)}, x86_64: installed", status), \
        status + upgrade[-3000:]
    # the kernel a boot loader boots next: the newest installed
    assert system.run("linux-version list | linux-version sort | tail -n 1").stdout.strip() == security
    return upgrade


def check_after_the_reboot(system: DebianSystem, kernel_release: str, client_key: Path, known_hosts: Path) -> None:
    """Reboot onto the new kernel: module loaded with its options, same keys and host key, right answers and
    cookies."""
    host_key, keys = system.get(HOST_KEY), system.get(KEYS)
    system.reboot_onto(kernel_release)
    gid = system.run("getent group mitigator_agent | cut -d: -f3").stdout.strip()
    assert system.run("cat /sys/module/tcpsecrets/parameters/read_gid").stdout.strip() == gid
    assert (system.get(HOST_KEY), system.get(KEYS)) == (host_key, keys)
    result = get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr
    answer = fields(result.stdout, ": ")
    proc = fields(system.run("cat /proc/tcp_secrets").stdout, " ")
    assert answer["net_secret"] == proc["net_secret"]
    assert answer["syncookie_secret"] == proc["cookie_secret"]
    # the cookies: SYN-ACKs and ACKs made from the agent's answer, checked by the kernel
    selftest = system.run("mitigator-agent selftest", check=False)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    check = system.run("mitigator-agent check", check=False).stdout
    assert "ok   module loaded (/dev/tcpsecrets" in check, check


def check_loud_without_headers(system: DebianSystem, found: Dict[str, str], client_key: Path, known_hosts: Path,
                               module_version: str) -> None:
    """The new kernel's headers gone and DKMS's build with them: apt's output says so when the kernel is
    installed, at boot the agent logs an error naming the kernel and the fix, `check` fails with the
    cause, and `get` answers exit 2."""
    security = found["security"]
    system.run(f"dkms remove -m tcpsecrets -v {module_version} -k {security}")
    system.run(f"{APT} purge linux-headers-{security}", timeout=900)
    # apt says so whenever that kernel is (re)installed: the hook runs after DKMS's own
    reinstall = system.run(f"{APT} install --reinstall linux-image-{security} 2>&1", timeout=1800).stdout
    assert (f"tcpsecrets: ERROR: no tcpsecrets module for kernel {security}: its headers (linux-headers-{security})"
            f" are not installed, so DKMS could not build it.") in reinstall, reinstall[-3000:]
    assert f"fix it first: apt install linux-headers-{security}" in reinstall
    system.reboot()
    assert system.run("test -e /dev/tcpsecrets", check=False).returncode == 1
    system.run(WAIT_FOR_PORT)
    journal = system.run("journalctl -b -u mitigator-agent.service -p err --no-pager -o cat").stdout
    assert re.search(rf"will-not-work check=module .*kernel {re.escape(security)}.*"
                     rf"linux-headers-{re.escape(security)}", journal), journal
    check = system.run("mitigator-agent check", check=False)
    assert check.returncode == 1
    assert (f"FAIL module loaded: tcpsecrets module not loaded (no /dev/tcpsecrets): tcpsecrets is not built for"
            f" kernel {security}: its headers (linux-headers-{security}) are not installed") in check.stdout, check.stdout
    result = get(system, client_key, known_hosts)
    assert result.returncode == 2, (result.stdout, result.stderr)


# The fixtures both install paths' test modules use (each defines `system`, the booted image with
# what it installs from).

@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MITIGATOR's key pair, on the host."""
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator1", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def kernels(system: DebianSystem) -> Dict[str, str]:
    """The point-release and security kernels, as the guest's apt lists them (see find_kernels)."""
    return find_kernels(system)


@pytest.fixture(scope="module")
def known_hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MITIGATOR's pin of the agent's host key, written at the install."""
    return tmp_path_factory.mktemp("pins") / "known_hosts"
