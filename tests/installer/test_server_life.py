"""A server's life after its first install, in one booted Debian 12 system: the install of an older
script moved to the packages, then a kernel security update and a reboot onto it.

Until LEGACY_COMMIT the install script put the agent in a venv under
/usr/lib/mitigator-agent, its units in /etc/systemd/system and its kernel hooks
and settings as files of its own, and recorded its version in
/var/lib/mitigator-agent/version. Servers installed so exist: today's script
moves them to the packages it carries (installer/mitigator-agent.sh,
set_legacy_aside). In order:

- the server boots bookworm's point-release kernel, as before its first
  security update (tests/installer/kernel_update.py);
- the older script installs (built from the repository's history, as its
  admins got it), MITIGATOR polls, and the package alone refuses that server;
- today's script moves it to the packages while MITIGATOR polls every 0.5 s:
  none may fail; the keys, host key and previous tcp_syncookies stay;
- the kernel part of the security update (linux-image-amd64 and
  linux-headers-amd64 from bookworm-security: a new ABI) gets the module built
  by DKMS before the reboot, and after the reboot the agent serves right
  cookies with the same host key (`make test-long` runs the whole
  `apt-get dist-upgrade`, and a kernel DKMS cannot build for);
- a purge leaves the system as it was before the older script's install (the
  kernel packages the update brought aside).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from tests.packaging.debs import build_debs_for_test
from tests.polling import PollingThrough

from . import kernel_update as scenario
from .kernel_update import client_key, kernels, known_hosts  # noqa: F401 (fixtures)
from .system import DebianSystem, diff_states
from .test_install_script import AGENT_STATE, HOST_KEY, INSTALL_TIMEOUT, KEYS, REPO, SCRIPT, VERSION, build_dist, \
    ssh_get_command

# The last commit whose install script made a venv (the next one made the script carry the packages).
LEGACY_COMMIT = "d5df33e"
LEGACY_VERSION = "0.0.9"  # lower than kmod/VERSION: the move is an update too
LEGACY_SCRIPT = "/root/mitigator-agent-legacy"
AGENT_DEB = "/root/mitigator-agent.deb"
# What the older script left where the packages now put their own, and the script's copies of it.
LEGACY_LEFTOVERS = ("/etc/systemd/system/mitigator-agent.service", "/etc/systemd/system/mitigator-agent.socket",
                    "/usr/local/sbin/mitigator-agent", "/usr/local/share/man/man8/mitigator-agent.8",
                    "/usr/local/share/bash-completion/completions/mitigator-agent",
                    "/var/lib/mitigator-agent/version", "/var/lib/mitigator-agent/tcp_syncookies-before",
                    "/var/lib/mitigator-agent/apt-installed", "/var/lib/mitigator-agent-install/legacy")
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0"


def build_legacy_dist(out: Path, workdir: Path) -> Path:
    """LEGACY_COMMIT's make-dist.sh run in a checkout of that commit (a clone sharing this repository's objects)."""
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{LEGACY_COMMIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.fail(f"commit {LEGACY_COMMIT} is not in this clone (a shallow clone?): the older install script is"
                    " built from it; fetch the history (git fetch --unshallow)", pytrace=False)
    tree = workdir / "legacy-tree"
    for argv in (["git", "clone", "-q", "--shared", "--no-checkout", str(REPO), str(tree)],
                 ["git", "-C", str(tree), "checkout", "-q", LEGACY_COMMIT]):
        subprocess.run(argv, check=True, capture_output=True)
    made = subprocess.run([str(tree / "installer" / "make-dist.sh")], cwd=tree, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/root", "VERSION": LEGACY_VERSION, "OUT": str(out),
                               "PYTHON": str(REPO / ".venv" / "bin" / "python")})
    if made.returncode != 0:
        pytest.fail(f"{LEGACY_COMMIT}'s installer/make-dist.sh failed:\n{made.stdout}{made.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, tmp_path_factory: pytest.TempPathFactory) -> DebianSystem:
    where = tmp_path_factory.mktemp("dists")
    debian_system.put(build_legacy_dist(where / "legacy" / "mitigator-agent", where), LEGACY_SCRIPT, mode=0o644)
    debian_system.put(build_dist(where / "today" / "mitigator-agent", VERSION), SCRIPT, mode=0o644)
    debian_system.put(build_debs_for_test(tmp_path_factory, "debs").agent, AGENT_DEB)
    return debian_system


def owner(system: DebianSystem, path: str) -> str:
    """The package dpkg says `path` belongs to ("" for none)."""
    found = system.run(["dpkg-query", "-S", path], check=False).stdout
    return found.split(":")[0].split(",")[0].strip() if found else ""


@pytest.fixture(scope="module")
def seen() -> Dict[str, object]:
    """What one step records for the next (the state before the first install, the kept files)."""
    return {}


def test_the_server_runs_the_point_release_kernel(system, kernels):
    scenario.boot_the_point_release_kernel(system, kernels)


def test_the_older_script_installs_its_venv(system, client_key, known_hosts, seen):
    seen["pristine"] = system.state()
    seen["syncookies"] = system.run("sysctl -n net.ipv4.tcp_syncookies").stdout.strip()
    out = system.run(f"cat {LEGACY_SCRIPT} | sh", timeout=INSTALL_TIMEOUT).stderr
    assert f"mitigator-agent {LEGACY_VERSION} is installed and running." in out, out[-3000:]
    assert system.run("cat /var/lib/mitigator-agent/version").stdout.strip() == LEGACY_VERSION
    assert system.run("ls /usr/lib/mitigator-agent | grep -c '^venv-'").stdout.strip() == "1"
    assert scenario.admit(system, client_key, known_hosts.parent) == known_hosts
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr
    seen["kept"] = {path: system.get(path) for path in (KEYS, HOST_KEY, HOST_KEY + ".pub")}


def test_the_package_alone_refuses_that_server(system):
    # dpkg runs the preinst before it looks at dependencies: it refuses before anything is unpacked.
    done = system.run(f"dpkg -i {AGENT_DEB} 2>&1", check=False)
    assert done.returncode != 0
    assert "run the install script of this version (sh mitigator-agent)" in done.stdout, done.stdout
    status = system.run("dpkg-query -W -f '${Status}' mitigator-agent 2>&1", check=False).stdout
    assert "installed" not in status.replace("not-installed", ""), status


def test_todays_script_moves_it_to_the_packages_losing_no_poll(system, client_key, known_hosts):
    with PollingThrough(ssh_get_command(system, client_key, known_hosts)) as polling:
        result = system.run(f"sh {SCRIPT}", timeout=INSTALL_TIMEOUT, check=False)
    print(result.stderr)
    print(polling.summary())
    assert result.returncode == 0, result.stderr[-4000:]
    assert polling.polls and polling.failed == [], polling.summary() + f": {polling.failed}"
    out = result.stderr
    assert f"[i] updating {LEGACY_VERSION} to {VERSION}" in out
    assert f"[i] moving the install of an older script ({LEGACY_VERSION}) to the packages" in out
    assert "[i] the older script's install now runs as the packages tcpsecrets-dkms mitigator-agent" in out
    assert f"mitigator-agent {VERSION} is installed and running (Debian packages" in out


def test_the_server_is_laid_out_as_the_packages_lay_it_out(system, client_key, known_hosts, seen):
    kept = seen["kept"]
    assert isinstance(kept, dict)
    assert {path: system.get(path) for path in kept} == kept
    left = system.run("ls -d " + " ".join(LEGACY_LEFTOVERS) + " /usr/lib/mitigator-agent/venv-* 2>/dev/null",
                      check=False).stdout
    assert left == ""
    assert system.run("dpkg-query -W -f '${Status} ${Version}\\n' tcpsecrets-dkms mitigator-agent"
                      ).stdout.splitlines() == [f"install ok installed {VERSION}-1"] * 2
    for unit in ("mitigator-agent.service", "mitigator-agent.socket"):
        assert system.run(f"systemctl show -p FragmentPath --value {unit}").stdout.strip() == \
            f"/lib/systemd/system/{unit}"
        assert system.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    # The value from before the older script's install, under the package's name: a remove restores it.
    assert system.run("cat /var/lib/mitigator-agent/tcp_syncookies.before").stdout.strip() == seen["syncookies"]
    assert re.findall(r"^tcpsecrets/([^,:]+)", system.run("dkms status").stdout, re.M) == [VERSION]
    assert system.run("cat /sys/module/tcpsecrets/version").stdout.strip() == VERSION
    selftest = system.run("mitigator-agent selftest", check=False)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr


def test_the_postinst_run_again_changes_nothing(system):
    before = system.state()
    system.run("DEBIAN_FRONTEND=noninteractive dpkg-reconfigure mitigator-agent 2>&1")
    # The agent's own state (the sources it remembers) is written when the agent chooses, and at
    # each stop (the reconfigure restarts it): not the maintainer scripts' doing.
    assert [line for line in diff_states(before, system.state()) if f" {AGENT_STATE}" not in line] == []


def test_the_kernel_security_update_builds_the_module_for_its_kernel(system, kernels):
    scenario.update_the_kernel(system, kernels, VERSION, scenario.KERNEL_UPDATE)


def test_after_the_reboot_the_agent_serves_right_cookies_with_the_same_host_key(system, kernels, client_key,
                                                                                 known_hosts):
    scenario.check_after_the_reboot(system, kernels["security"], client_key, known_hosts)


def test_a_purge_leaves_the_system_as_before_the_older_install(system, kernels, seen):
    result = system.run("mitigator-agent -d --purge --yes", timeout=INSTALL_TIMEOUT)
    assert result.stderr.strip().splitlines()[-1] == "mitigator-agent is uninstalled.", result.stderr
    pristine = seen["pristine"]
    assert isinstance(pristine, dict)
    # Not the install's: the kernel the update brought, the headers of the kernel now running (the
    # headers metapackage pulled them in; apt keeps the running kernel's) with what they need (the
    # compiler the install had added among them), and the pin that kept the update out until then.
    closure = system.run(f"apt-cache depends --recurse --installed --no-recommends --no-suggests"
                         f" linux-headers-{kernels['security']}").stdout
    needed = {line.strip().split(":")[0] for line in closure.splitlines() if line and not line.startswith(" ")}
    theirs = re.compile(rf"[+~-] (packages linux-|files {re.escape(scenario.PIN_FILE)}:)")
    left = [line for line in diff_states(pristine, system.state())
            if not theirs.match(line) and not (line.startswith("+ packages ") and line.split()[2].split(":")[0] in needed)]
    # (and the files of those packages, such as binutils' /etc/gprofng.rc)
    assert [line for line in left if not (line.startswith("+ files ") and owner(system, line.split()[2][:-1]) in needed)] \
        == []
    assert system.run("sysctl -n net.ipv4.tcp_syncookies").stdout.strip() == seen["syncookies"]
