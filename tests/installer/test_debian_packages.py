"""The .debs in a real Debian 12 system: install, poll, upgrade, remove, purge.

One boot for the module (`debian_system`, tests/installer/system.py); the
tests run in file order on the same system, each step on what the one before
left: install the packages of kmod/VERSION with apt (which pulls dkms and the
kernel headers, and DKMS builds the module in the guest), poll over the
forwarded port with OpenSSH, upgrade to a higher version built from the same
tree, remove (keys and host key stay), purge (nothing stays). What apt
installed for the packages (dkms, the headers, the compiler) is purged too
(the running kernel's headers by name: apt never autoremoves them), so the
state after purge is compared with the state before the install as a whole:
no exception.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.packaging.debs import Debs, build_debs_for_test, tree_version
from tests.polling import PollingThrough

from .system import DebianSystem, diff_states

pytestmark = pytest.mark.system

AGENT_USER = "mitigator_agent"
HOME = "/opt/mitigator_agent"
KEYS = f"{HOME}/keys"
HOST_KEY = f"{HOME}/host.ed25519"
KEPT = (KEYS, HOST_KEY, f"{HOST_KEY}.pub")
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0"
INSTALL_TIMEOUT = 2400  # apt, the headers and a DKMS build of the module under TCG
AGENT_STATE = "/opt/mitigator_agent/state"  # the agent's remembered sources and anycast set
WAIT_SECONDS = 120  # the agent's listener coming up (or back) under TCG
GET_KEYS = ("uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
            "tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling")


def higher(version: str) -> str:
    """VERSION with its last component one up: what an update brings."""
    parts = version.split(".")
    return ".".join(parts[:-1] + [str(int(parts[-1]) + 1)])


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Debs]:
    """The packages of kmod/VERSION ("old") and of the next version ("new"), from this tree."""
    return {"old": build_debs_for_test(tmp_path_factory, "debs-old"),
            "new": build_debs_for_test(tmp_path_factory, "debs-new", higher(tree_version()))}


@pytest.fixture(scope="module")
def seen() -> Dict[str, object]:
    """What one step records for the next (state before install, kept files, fingerprint)."""
    return {}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ed25519 key pair on the host, MITIGATOR's stand-in."""
    workdir = tmp_path_factory.mktemp("client")
    workdir.chmod(0o700)
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator-test", "-f", str(key)],
                   check=True)
    return key


def install(system: DebianSystem, debs: Debs) -> str:
    """apt-get install ./both.debs in the guest, as an admin would; the output."""
    for deb in (debs.dkms, debs.agent):
        system.put(deb, f"/root/{deb.name}")
    done = system.run(f"{APT} install /root/{debs.dkms.name} /root/{debs.agent.name} 2>&1",
                      timeout=INSTALL_TIMEOUT)
    print(done.stdout)
    return done.stdout


def wait_for_listener(system: DebianSystem) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while system.run("ss -Htln 'sport = :7100'").stdout.strip() == "":
        assert time.monotonic() < deadline, system.run("journalctl -u mitigator-agent -n 30 -o cat").stdout
        time.sleep(1)


def openssh_get_command(system: DebianSystem, client: Path) -> List[str]:
    """The OpenSSH `get` from the host through the forwarded port, the guest's host key pinned."""
    known_hosts = client.with_name("known_hosts")
    pub = system.get(f"{HOST_KEY}.pub").decode().split()
    known_hosts.write_text(f"[127.0.0.1]:{system.agent_port} {pub[0]} {pub[1]}\n")
    return ["ssh", "-F", "/dev/null", "-p", str(system.agent_port), "-i", str(client),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=60",
            f"{AGENT_USER}@127.0.0.1", "get"]


def openssh_get(system: DebianSystem, client: Path) -> Dict[str, str]:
    """`get` from the host with OpenSSH through the forwarded port, the host key pinned."""
    done = subprocess.run(openssh_get_command(system, client),
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    answer = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert list(answer) == list(GET_KEYS), done.stdout
    return answer


def proc_secrets(system: DebianSystem) -> Dict[str, str]:
    return dict(line.split(" ", 1) for line in system.run("cat /proc/tcp_secrets").stdout.splitlines())


def fingerprint(system: DebianSystem) -> List[str]:
    """bits and SHA256 of the host key, as ssh-keygen in the guest reads the .pub."""
    return system.run(["ssh-keygen", "-l", "-f", f"{HOST_KEY}.pub"]).stdout.split()[:2]


def stat(system: DebianSystem, path: str) -> str:
    return system.run(["stat", "-c", "%a %U:%G", path]).stdout.strip()


def kept_files(system: DebianSystem) -> Dict[str, bytes]:
    return {path: system.get(path) for path in KEPT}


def test_install_pulls_its_dependencies_and_sets_the_server_up(debian_system: DebianSystem,
                                                               builds: Dict[str, Debs],
                                                               seen: Dict[str, object]) -> None:
    system, debs = debian_system, builds["old"]
    system.run(f"{APT} update", timeout=600)
    seen["before"] = system.state()
    output = install(system, debs)

    gid = system.run(["getent", "group", AGENT_USER]).stdout.split(":")[2]
    assert system.run(["getent", "passwd", AGENT_USER]).stdout.strip().endswith(
        f":{HOME}:/usr/sbin/nologin")
    assert system.get("/sys/module/tcpsecrets/version").decode().strip() == debs.version
    assert system.get("/sys/module/tcpsecrets/parameters/read_gid").decode().strip() == gid
    assert system.get("/etc/modprobe.d/tcpsecrets.conf").decode().splitlines()[-1] == \
        f"options tcpsecrets read_gid={gid}"
    assert system.get("/proc/sys/net/ipv4/tcp_syncookies").decode().strip() == "2"
    assert system.run("systemctl is-active mitigator-agent").stdout.strip() == "active"
    assert system.run("systemctl is-enabled mitigator-agent").stdout.strip() == "enabled"
    assert stat(system, HOME) == f"755 {AGENT_USER}:{AGENT_USER}"
    assert stat(system, KEYS) == f"640 root:{AGENT_USER}"
    assert stat(system, HOST_KEY) == f"600 {AGENT_USER}:{AGENT_USER}"
    assert stat(system, f"{HOST_KEY}.pub") == f"644 {AGENT_USER}:{AGENT_USER}"
    # The fingerprint the install printed is the host key's, and the command says the same.
    bits, sha = fingerprint(system)
    assert re.search(rf"mitigator-agent: host key {bits} {re.escape(sha)} ", output), output
    again = system.run(["runuser", "-u", AGENT_USER, "--", "mitigator-agent", "host-key"]).stdout.split()
    assert again[:2] == [bits, sha]
    assert system.run("mitigator-agent --version").stdout.strip() == f"mitigator-agent, version {debs.version}"


def test_a_key_appended_as_root_admits_an_openssh_get(debian_system: DebianSystem, client: Path,
                                                      seen: Dict[str, object]) -> None:
    system = debian_system
    system.run(f"cat >> {KEYS}", input=client.with_suffix(".pub").read_bytes())
    wait_for_listener(system)
    answer = openssh_get(system, client)
    proc = proc_secrets(system)
    assert answer["net_secret"] == proc["net_secret"]
    assert answer["syncookie_secret"] == proc["cookie_secret"]
    assert answer["ts_secret"] == proc["timestamp_secret"]
    seen["kept"] = kept_files(system)


def test_postinst_run_again_changes_nothing(debian_system: DebianSystem, client: Path,
                                            seen: Dict[str, object]) -> None:
    """Configuring the installed package again (dpkg-reconfigure) succeeds and leaves the system as it was."""
    system = debian_system
    before = system.state()
    system.run("DEBIAN_FRONTEND=noninteractive dpkg-reconfigure mitigator-agent 2>&1")
    # The agent's own state (the sources it remembers) is written when the agent chooses, and at
    # each stop (the reconfigure restarts it): not the maintainer scripts' doing.
    changed = [line for line in diff_states(before, system.state()) if f" {AGENT_STATE}" not in line]
    assert changed == []
    assert kept_files(system) == seen["kept"]
    wait_for_listener(system)
    openssh_get(system, client)


def test_upgrade_keeps_keys_and_host_key_and_the_new_version_answers(debian_system: DebianSystem,
                                                                      builds: Dict[str, Debs], client: Path,
                                                                      seen: Dict[str, object]) -> None:
    system, new = debian_system, builds["new"]
    pid_before = system.run("systemctl show -p MainPID --value mitigator-agent").stdout.strip()
    # MITIGATOR polls on through the upgrade: the restart and the module swap refuse none.
    with PollingThrough(openssh_get_command(system, client)) as polling:
        install(system, new)
    print(polling.summary())
    assert polling.polls and polling.failed == [], polling.summary() + f": {polling.failed}"
    assert kept_files(system) == seen["kept"]
    assert system.run("mitigator-agent --version").stdout.strip() == f"mitigator-agent, version {new.version}"
    # The module DKMS built for the new version is the one loaded; the old one is gone from DKMS.
    assert system.get("/sys/module/tcpsecrets/version").decode().strip() == new.version
    assert f"tcpsecrets/{builds['old'].version}" not in system.run("dkms status").stdout
    # The service was restarted on the new code.
    assert system.run("systemctl show -p MainPID --value mitigator-agent").stdout.strip() != pid_before
    wait_for_listener(system)
    journal = system.run("journalctl -u mitigator-agent -o cat").stdout
    started = [line for line in journal.splitlines() if re.match(r"(.* )?starting version=", line)]
    assert started and f"version={new.version} " in started[-1], journal[-2000:]
    assert openssh_get(system, client)["net_secret"] == proc_secrets(system)["net_secret"]


def test_remove_keeps_keys_host_key_and_user(debian_system: DebianSystem, seen: Dict[str, object]) -> None:
    system = debian_system
    system.run(f"{APT} remove mitigator-agent tcpsecrets-dkms 2>&1", timeout=INSTALL_TIMEOUT)
    assert kept_files(system) == seen["kept"]
    assert system.run(["getent", "passwd", AGENT_USER]).stdout
    assert system.run("systemctl is-active mitigator-agent", check=False).stdout.strip() == "inactive"
    # Nothing of the agent's code is left, not even bytecode compiled at install.
    assert system.run("ls /usr/lib/mitigator-agent /usr/sbin/mitigator-agent 2>&1", check=False).returncode != 0
    assert system.run("ls -d /usr/src/tcpsecrets-* 2>/dev/null", check=False).stdout == ""
    assert "tcpsecrets" not in system.run("dkms status").stdout


DKMS_SIGNING_KEY = re.compile(r"\+ files /var/lib/dkms(: dir 0755 root:root|/mok\.key: file 0600 root:root \S+"
                              r"|/mok\.pub: file 0644 root:root \S+)$")


def test_purge_leaves_nothing(debian_system: DebianSystem, seen: Dict[str, object]) -> None:
    system = debian_system
    before = seen["before"]
    assert isinstance(before, dict)
    system.run(f"{APT} purge mitigator-agent tcpsecrets-dkms 2>&1", timeout=INSTALL_TIMEOUT)
    # What apt installed for them goes too, by name: apt never autoremoves the running kernel's
    # headers (APT::NeverAutoRemove) nor what they pull in, and Recommends it followed may be
    # kept by other Recommends. sudo (a Recommends of dkms) refuses to go on a system without a
    # root password, as this image is, unless told.
    added = sorted(set(system.state()["packages"]) - set(before["packages"]))
    if added:
        system.run(f"SUDO_FORCE_REMOVE=yes {APT} purge {' '.join(added)} 2>&1", timeout=INSTALL_TIMEOUT)
    left = diff_states(before, system.state())
    if "dkms" in added:
        # DKMS signs what it builds with a key it makes (with openssl, which this server has) and
        # keeps that key when it is purged: the firmware may trust it (MOK). DKMS's, not ours.
        left = [line for line in left if not DKMS_SIGNING_KEY.match(line)]
    assert left == [], "\n".join(left)


def test_the_package_refuses_a_server_the_install_script_manages(debian_system: DebianSystem,
                                                                 builds: Dict[str, Debs]) -> None:
    system, debs = debian_system, builds["old"]
    system.run("mkdir -p /usr/lib/mitigator-agent && touch /usr/lib/mitigator-agent/install.sh")
    try:
        system.put(debs.agent, f"/root/{debs.agent.name}")
        # dpkg runs the preinst before it looks at dependencies: no DKMS build needed to see it refuse.
        done = system.run(f"dpkg -i /root/{debs.agent.name} 2>&1", check=False)
        assert done.returncode != 0
        assert "run 'mitigator-agent -d' first" in done.stdout, done.stdout
        status = system.run("dpkg-query -W -f '${Status}' mitigator-agent 2>&1", check=False).stdout
        assert "installed" not in status.replace("not-installed", ""), status
    finally:
        system.run("rm -rf /usr/lib/mitigator-agent")
