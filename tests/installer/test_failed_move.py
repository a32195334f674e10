"""A move of an older script's install to the packages that fails half-way puts that install back.

`make test-long` (group long-failed-move): the older script (test_server_life.LEGACY_COMMIT) installs
in a booted Debian 12 system; today's script moves it to the packages and is interrupted as an admin's
Ctrl-C interrupts it (SIGTERM to its process group) when the packages are installed and serving, the
worst moment for a rollback. Its rollback (installer/mitigator-agent.sh, restore_legacy) must leave
the system as the older install had it, serving again with the same keys and host key; then the
script run again completes the move.
"""

from __future__ import annotations

import re
import time
from typing import Dict

import pytest

from tests.polling import PollingThrough

from .kernel_update import client_key, known_hosts  # noqa: F401 (fixtures)
from . import kernel_update as scenario
from .system import DebianSystem, diff_states
from .test_install_script import AGENT_STATE, HOST_KEY, INSTALL_TIMEOUT, KEYS, SCRIPT, VERSION, build_dist, \
    fields, ssh_get_command
from .test_server_life import LEGACY_SCRIPT, LEGACY_VERSION, build_legacy_dist

pytestmark = [pytest.mark.long, pytest.mark.system]

OUT = "/root/failed-move.out"
# The failures restore_legacy can report (each step says what to run by hand): none may show.
RESTORE_FAILURES = re.compile(r"^\[!\] (DKMS could not|cannot put back|dpkg --|some packages this run added|"
                              r"cannot load|sysctl -p|the older agent does not start)", re.M)


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, tmp_path_factory: pytest.TempPathFactory) -> DebianSystem:
    where = tmp_path_factory.mktemp("dists")
    debian_system.put(build_legacy_dist(where / "legacy" / "mitigator-agent", where), LEGACY_SCRIPT, mode=0o644)
    debian_system.put(build_dist(where / "today" / "mitigator-agent", VERSION), SCRIPT, mode=0o644)
    return debian_system


def module_identity(system: DebianSystem) -> str:
    """The loaded tcpsecrets module's version and srcversion (those it has)."""
    return system.run("cat /sys/module/tcpsecrets/version /sys/module/tcpsecrets/srcversion 2>/dev/null",
                      check=False).stdout


@pytest.fixture(scope="module")
def seen() -> Dict[str, object]:
    """What one step records for the next."""
    return {}


def test_the_older_script_installs(system, client_key, known_hosts, seen):
    out = system.run(f"cat {LEGACY_SCRIPT} | sh", timeout=INSTALL_TIMEOUT).stderr
    assert f"mitigator-agent {LEGACY_VERSION} is installed and running." in out, out[-3000:]
    assert scenario.admit(system, client_key, known_hosts.parent) == known_hosts
    assert scenario.get(system, client_key, known_hosts).returncode == 0
    seen["module"] = module_identity(system)
    seen["kept"] = {path: system.get(path) for path in (KEYS, HOST_KEY, HOST_KEY + ".pub")}
    seen["state"] = system.state()


def test_a_move_interrupted_with_the_packages_serving_puts_the_older_install_back(system, client_key, known_hosts,
                                                                                   seen):
    with PollingThrough(ssh_get_command(system, client_key, known_hosts)) as polling:
        system.run(f"(setsid sh -c 'echo $$ > /root/installer.pgid; MITIGATOR_AGENT_STEP_PAUSE=switch sh {SCRIPT}'"
                   f" > {OUT} 2>&1 &)")
        deadline = time.monotonic() + INSTALL_TIMEOUT
        while system.run(f"grep -q 'pausing at step switch' {OUT}", check=False).returncode != 0:
            text = system.run(f"cat {OUT}").stdout
            assert time.monotonic() < deadline and not re.search(r"^mitigator-agent: ", text, re.M), text
            time.sleep(5)
        assert system.run("dpkg-query -W -f '${Status}\\n' tcpsecrets-dkms mitigator-agent").stdout.splitlines() \
            == ["install ok installed"] * 2
        # As Ctrl-C at a terminal: the signal reaches every process of the group.
        system.run("kill -TERM -$(cat /root/installer.pgid)")
        while system.run("ps -o pid= -g $(cat /root/installer.pgid)", check=False).returncode == 0:
            assert time.monotonic() < deadline, system.run(f"cat {OUT}").stdout
            time.sleep(5)
        back = time.monotonic()
        polling.wait_answered(3, since=back, timeout=120)
    out = system.run(f"cat {OUT}").stdout
    print(out)
    print(polling.summary())
    assert f"[!] moving to the packages failed: putting the older script's install ({LEGACY_VERSION}) back" in out
    assert f"[!] update failed: the previous version ({LEGACY_VERSION}) keeps running" in out
    assert out.rstrip().splitlines()[-1] == "mitigator-agent: interrupted: run it again to complete the install"
    assert not RESTORE_FAILURES.search(out), out
    # The packages' agent served until the rollback removed it; the older one serves again.
    assert [poll for poll in polling.polls if poll.started > back and not poll.answered] == []
    assert system.run("ls -d /tmp/mitigator-agent.* 2>/dev/null", check=False).stdout == ""

    kept = seen["kept"]
    assert isinstance(kept, dict)
    assert {path: system.get(path) for path in kept} == kept
    assert module_identity(system) == seen["module"]
    result = scenario.get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr
    answer, proc = fields(result.stdout, ": "), fields(system.run("cat /proc/tcp_secrets").stdout, " ")
    assert (answer["net_secret"], answer["syncookie_secret"]) == (proc["net_secret"], proc["cookie_secret"])
    before = seen["state"]
    assert isinstance(before, dict)
    # Not the rollback's doing: the agent's own state (written at each of its stops) and DKMS's build
    # of the older module again (its logs and objects carry times); a file DKMS's tree gains or loses
    # would show.
    noise = re.compile(rf"^(. files {re.escape(AGENT_STATE)}|~ files /var/lib/dkms/tcpsecrets/{re.escape(LEGACY_VERSION)}/)")
    assert [line for line in diff_states(before, system.state()) if not noise.match(line)] == []


def test_the_script_run_again_completes_the_move(system, client_key, known_hosts):
    result = system.run(f"sh {SCRIPT}", timeout=INSTALL_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[i] the older script's install now runs as the packages tcpsecrets-dkms mitigator-agent" in result.stderr
    assert system.run("dpkg-query -W -f '${Status} ${Version}\\n' tcpsecrets-dkms mitigator-agent"
                      ).stdout.splitlines() == [f"install ok installed {VERSION}-1"] * 2
    assert system.run("cat /sys/module/tcpsecrets/version").stdout.strip() == VERSION
    assert scenario.get(system, client_key, known_hosts).returncode == 0
