"""The system-test harness itself: the image boots a real Debian 12 and system.py drives it.

One boot for the whole module (the `debian_system` fixture). The tests run in
file order: the apt cache is checked before `apt-get update` may change what
apt wants, and the reboot comes last.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.request

import pytest

from .system import DebianSystem, GuestCommandError, SystemImage, diff_states

pytestmark = pytest.mark.system

# What the installer asks apt for; the image build downloaded their closure.
INSTALL_PACKAGES = ["dkms", "python3-venv", "openssl", "mokutil"]
# Units the image itself configures or relies on; none of them may fail.
OUR_UNITS = ["systemd-journald.service", "systemd-udevd.service", "systemd-networkd.service",
             "systemd-networkd-wait-online.service", "ssh.service"]
WAIT_SECONDS = 120  # upper bound on a guest listener coming up under TCG


def test_pid1_is_systemd_and_the_system_is_up(debian_system: DebianSystem) -> None:
    """PID 1 is systemd; the boot finished with no failed unit (journald, udev, networkd, sshd up)."""
    assert debian_system.run("readlink /proc/1/exe").stdout.strip() == "/usr/lib/systemd/systemd"
    assert debian_system.run("cat /proc/1/comm").stdout.strip() == "systemd"
    state = debian_system.run("systemctl is-system-running --wait", check=False).stdout.strip()
    failed = debian_system.run("systemctl list-units --failed --no-legend --plain").stdout
    print(f"system state: {state}; failed units: {failed.strip() or 'none'}")
    assert state in ("running", "degraded")
    assert not any(unit in failed for unit in OUR_UNITS), failed
    active = debian_system.run(["systemctl", "is-active", *OUR_UNITS[:3], "ssh.service"])
    assert active.stdout.split() == ["active"] * 4


def test_runs_the_images_kernel_with_dhcp_on_the_nic(debian_system: DebianSystem,
                                                       system_image: SystemImage) -> None:
    """The kernel is the image's own; networkd leased qemu's address on the virtio NIC."""
    assert debian_system.run("uname -r").stdout.strip() == system_image.kernel_release
    addresses = debian_system.run("ip -4 -o addr show scope global").stdout
    assert " 10.0.2.15/24 " in addresses, addresses
    assert "dynamic" in addresses, addresses  # from DHCP, not configured statically


def test_the_installers_packages_are_downloaded_not_installed(debian_system: DebianSystem) -> None:
    """Installing what the installer needs downloads nothing: every .deb is in apt's cache."""
    kver = debian_system.run("uname -r").stdout.strip()
    wanted = INSTALL_PACKAGES + [f"linux-headers-{kver}"]
    for package in ["dkms", "python3-venv", f"linux-headers-{kver}", "build-essential"]:
        status = debian_system.run(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
        assert "install ok installed" not in status.stdout, f"{package} is installed in the image"
    assert debian_system.run("apt-config dump APT::Keep-Downloaded-Packages").stdout.strip() == \
        'APT::Keep-Downloaded-Packages "true";'
    # --print-uris lists only what would have to be downloaded.
    plan = debian_system.run(["apt-get", "install", "-qq", "--print-uris", *wanted]).stdout
    assert [line for line in plan.splitlines() if line.startswith("'")] == [], plan
    simulated = debian_system.run(["apt-get", "install", "-s", *wanted]).stdout
    assert "Inst dkms " in simulated and "Inst python3-venv " in simulated, simulated


def test_apt_in_the_guest_reaches_the_mirror(debian_system: DebianSystem) -> None:
    """`apt-get update` in the guest fetches bookworm, -updates and -security over qemu's network."""
    update = debian_system.run("apt-get update", timeout=600)
    for suite in ("bookworm", "bookworm-updates", "bookworm-security"):
        assert f" {suite} InRelease" in update.stdout, update.stdout
    assert "deb.debian.org" in debian_system.run("cat /etc/apt/sources.list").stdout


def test_the_forwarded_agent_port_reaches_a_guest_listener(debian_system: DebianSystem) -> None:
    """127.0.0.1:agent_port on the host is port 7100 in the guest."""
    token = secrets.token_hex(16)
    debian_system.run(f"mkdir -p /srv/probe && echo {token} > /srv/probe/token")
    debian_system.run("systemd-run --unit=probe-7100 python3 -m http.server 7100 "
                      "--bind 0.0.0.0 --directory /srv/probe")
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while debian_system.run("ss -Htln 'sport = :7100'").stdout.strip() == "":
            assert time.monotonic() < deadline, "the guest's listener on 7100 never came up"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{debian_system.agent_port}/token"
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.read().decode().strip() == token
    finally:
        debian_system.run("systemctl stop probe-7100", check=False)


def test_put_and_get_round_trip_bytes_exactly(debian_system: DebianSystem) -> None:
    """Every byte value, a missing final newline and a mode survive put() and get()."""
    data = bytes(range(256)) * 64 + os.urandom(100_000) + b"\r\n\x00no newline"
    debian_system.put(data, "/root/blob", mode=0o600)
    assert debian_system.get("/root/blob") == data
    assert debian_system.run("stat -c '%a %U' /root/blob").stdout.split() == ["600", "root"]
    with pytest.raises(GuestCommandError):
        debian_system.get("/root/no-such-file")


def test_run_reports_exit_status_and_input(debian_system: DebianSystem) -> None:
    """run() passes stdin, returns output and status, and raises on failure when checking."""
    assert debian_system.run("tr a-z A-Z", input="quiet\n").stdout == "QUIET\n"
    assert debian_system.run("exit 3", check=False).returncode == 3
    with pytest.raises(GuestCommandError, match="exited 4"):
        debian_system.run("echo why >&2; exit 4")
    assert debian_system.run(["printf", "%s|", "two words", "$HOME"]).stdout == "two words|$HOME|"


def test_state_is_stable_and_diff_states_sees_every_kind_of_change(debian_system: DebianSystem) -> None:
    """Two snapshots in a row are equal; a user, a file, a sysctl, a module and a unit show, and go."""
    before = debian_system.state()
    assert diff_states(before, debian_system.state()) == []
    assert before["packages"]["systemd"].endswith("install ok installed")
    assert before["files"]["/etc/hostname"].startswith("file 0644 root:root ")
    assert before["users"]["root"].startswith("root:x:0:0:")
    assert before["groups"]["root"].startswith("root:x:0:")
    assert before["sysctls"]["net.ipv4.tcp_syncookies"] == "1"
    assert before["unit_files"]["ssh.service"] == "enabled"
    assert "dummy" not in before["modules"]

    debian_system.run("useradd --system --no-create-home probeuser && "
                      "install -d -m 0750 -o probeuser /opt/probe && "
                      "echo x > /etc/probe.conf && sysctl -qw net.ipv4.tcp_syncookies=2 && "
                      "modprobe dummy && systemctl enable "
                      "systemd-time-wait-sync.service")
    changed = diff_states(before, debian_system.state())
    names = {" ".join(line.split()[:3]).rstrip(":") for line in changed}
    assert {"+ users probeuser", "+ groups probeuser", "+ files /opt/probe",
            "+ files /etc/probe.conf", "~ sysctls net.ipv4.tcp_syncookies", "+ modules dummy",
            "~ unit_files systemd-time-wait-sync.service"} <= names, changed

    debian_system.run("userdel probeuser && rm -r /opt/probe /etc/probe.conf && "
                      "sysctl -qw net.ipv4.tcp_syncookies=1 && rmmod dummy && "
                      "systemctl disable systemd-time-wait-sync.service")
    assert diff_states(before, debian_system.state()) == []


def test_reboot_comes_back_on_the_same_kernel_with_a_new_boot(debian_system: DebianSystem,
                                                              system_image: SystemImage) -> None:
    """reboot(): a new boot id, the same kernel and command line, the system up, the state unchanged."""
    boot_id = debian_system.boot_id()
    cmdline = debian_system.run("cat /proc/cmdline").stdout
    debian_system.run("echo survives > /root/marker")
    before = debian_system.state()
    debian_system.reboot()
    assert debian_system.boot_id() != boot_id
    assert debian_system.run("uname -r").stdout.strip() == system_image.kernel_release
    assert debian_system.run("cat /proc/cmdline").stdout == cmdline
    assert debian_system.run("systemctl is-system-running --wait",
                             check=False).stdout.strip() in ("running", "degraded")
    assert debian_system.get("/root/marker") == b"survives\n"  # the same disk, not a fresh one
    after = debian_system.state()
    # Loaded modules depend on what ran since boot (the tests above loaded some).
    before.pop("modules"), after.pop("modules")
    assert diff_states(before, after) == []
