"""The install script (dist/mitigator-agent, the two packages with apt) on a real Debian 12 system booted with systemd.

One boot, in order, as an admin would go: failures that must change
nothing, an install killed at three steps and run again until it completes,
the installed system checked from the host (OpenSSH `get`, systemd's
security rating, selftest), a reboot, an update to a higher version, and
uninstall then purge, compared with the system as it was before.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.polling import PollingThrough

from .system import DebianSystem, State, diff_states

REPO = Path(__file__).resolve().parents[2]
MAKE_DIST = REPO / "installer" / "make-dist.sh"
VERSION = (REPO / "kmod" / "VERSION").read_text().strip()
NEXT_VERSION = VERSION + ".1"  # a higher version for the update
SCRIPT = "/root/mitigator-agent"
NEXT_SCRIPT = "/root/mitigator-agent-next"
KEYS = "/opt/mitigator_agent/keys"
HOST_KEY = "/opt/mitigator_agent/host.ed25519"
LOG = "/var/log/mitigator-agent-install.log"
AGENT_STATE = "/opt/mitigator_agent/state"  # the agent's remembered sources and anycast set
INSTALL_TIMEOUT = 1800  # apt, a DKMS build and a venv under TCG
MAX_EXPOSURE = 2.0
# What an admin sees at each step (install, reboot check, update, uninstall), for people to read.
TRANSCRIPT = REPO / "build" / "installer" / "transcript.txt"


def build_dist(out: Path, version: str) -> Path:
    made = subprocess.run([str(MAKE_DIST)], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/root", "VERSION": version, "OUT": str(out)})
    if made.returncode != 0:
        pytest.fail(f"installer/make-dist.sh (VERSION={version}) failed:\n{made.stdout}{made.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    where = tmp_path_factory.mktemp("dist")
    return {VERSION: build_dist(where / VERSION / "mitigator-agent", VERSION),
            NEXT_VERSION: build_dist(where / NEXT_VERSION / "mitigator-agent", NEXT_VERSION)}


@pytest.fixture(scope="module")
def system(debian_system: DebianSystem, dists: Dict[str, Path]) -> DebianSystem:
    debian_system.put(dists[VERSION], SCRIPT, mode=0o644)
    debian_system.put(dists[NEXT_VERSION], NEXT_SCRIPT, mode=0o644)
    return debian_system


@pytest.fixture(scope="module")
def pristine(system: DebianSystem) -> State:
    """The system before anything was installed."""
    return system.state()


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator1", "-f", str(key)], check=True)
    return key


def install(system: DebianSystem, script: str = SCRIPT, env: str = "", check: bool = True,
            pipe: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the install as the README says: piped into sh (or `sh FILE`)."""
    line = f"cat {script} | {env} sh" if pipe else f"{env} sh {script}"
    return system.run(line, check=check, timeout=INSTALL_TIMEOUT)


@pytest.fixture(scope="module", autouse=True)
def fresh_transcript() -> None:
    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    TRANSCRIPT.write_text(f"# tests/installer/test_install_script.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")


def record(title: str, result: subprocess.CompletedProcess[str], seconds: Optional[float] = None) -> None:
    """Append a command and what it printed (and how long it took, when given) to the transcript."""
    took = f", {seconds:.0f} s" if seconds is not None else ""
    with TRANSCRIPT.open("a") as out:
        out.write(f"\n## {title}\n$ {result.args}\n{result.stdout}{result.stderr}(exit status {result.returncode}{took})\n")


def record_poll(result: subprocess.CompletedProcess[str]) -> None:
    """Append an OpenSSH `get` to the transcript with the secrets' values left out."""
    shown = "".join(line.split(": ", 1)[0] + (": (secret)\n" if "secret" in line else line[line.find(":"):] + "\n")
                    for line in result.stdout.splitlines())
    record("poll from the host with OpenSSH (secret values not shown)",
           subprocess.CompletedProcess(" ".join(result.args), result.returncode, shown, result.stderr))


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def ssh_get_command(system: DebianSystem, key: Path, known_hosts: Path, command: str = "get") -> List[str]:
    return ["ssh", "-F", "none", "-i", str(key), "-p", str(system.agent_port), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=60", "mitigator_agent@127.0.0.1", command]


def ssh_get(system: DebianSystem, key: Path, known_hosts: Path, command: str = "get") -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssh_get_command(system, key, known_hosts, command), capture_output=True, text=True,
                          timeout=300)


def pin_host_key(system: DebianSystem, where: Path) -> Path:
    public = system.get(HOST_KEY + ".pub").decode().split()
    known_hosts = where / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{system.agent_port} {public[0]} {public[1]}\n")
    return known_hosts


def fields(text: str, separator: str) -> Dict[str, str]:
    return dict(line.split(separator, 1) for line in text.strip().splitlines())


# --- failures before any install: one line, non-zero, nothing changed ---------------------------

def test_not_root_is_refused(system, pristine):
    result = system.run(f"cat {SCRIPT} | runuser -u nobody -- sh", check=False)
    assert (result.returncode, last_line(result)) == (1, "mitigator-agent: must run as root (try: sudo sh mitigator-agent)")
    assert diff_states(pristine, system.state()) == []


def test_kernel_without_kprobes_is_refused(system, pristine):
    release = system.run("uname -r").stdout.strip()
    system.run(f"grep -v '^CONFIG_KPROBES=' /boot/config-{release} > /root/config-no-kprobes")
    result = install(system, env="MITIGATOR_AGENT_KCONFIG=/root/config-no-kprobes", check=False)
    assert result.returncode == 1
    assert last_line(result) == (f"mitigator-agent: kernel {release} lacks CONFIG_KPROBES=y (/root/config-no-kprobes):"
                                 " the module needs it; use a distribution kernel")
    system.run("rm /root/config-no-kprobes")
    assert diff_states(pristine, system.state()) == []


def test_kernel_without_a_headers_package_is_refused(system, pristine):
    release = system.run("uname -r").stdout.strip()
    result = install(system, env=f"MITIGATOR_AGENT_KERNEL=6.1.0-999-amd64 MITIGATOR_AGENT_KCONFIG=/boot/config-{release}",
                     check=False)
    assert result.returncode == 1
    assert last_line(result) == (
        "mitigator-agent: no package linux-headers-6.1.0-999-amd64 for the running kernel in the apt sources:"
        " install its headers, or boot a distribution kernel (apt install linux-image-amd64, reboot) and run this again")
    assert diff_states(pristine, system.state()) == []


def test_apt_failing_midway_is_rolled_back(system, pristine):
    # dpkg's first run (apt's first batch of packages) unpacks, then fails: apt stops with those
    # unpacked and none configured. Everything it put there goes again.
    # (dpkg's own post-invoke hook, failing once only: the rollback's dpkg must run.)
    hook, failed = "/etc/dpkg/dpkg.cfg.d/99-test-fails", "/run/test-dpkg-failed"
    system.run(f"echo 'post-invoke=if [ ! -e {failed} ]; then touch {failed}; exit 1; fi' > {hook}")
    with_hook = system.state()
    result = install(system, check=False)
    assert result.returncode == 1, result.stderr
    assert "[!] install failed: removing what it did" in result.stderr
    assert re.fullmatch(rf"mitigator-agent: installing tcpsecrets-dkms mitigator-agent {re.escape(VERSION)} and"
                        r" linux-headers-\S+( \S+)* with apt-get failed"
                        r" \(see /var/log/mitigator-agent-install.log\): fix what it says, then run this again",
                        last_line(result))
    # dpkg really stopped half-way: packages were unpacked, none set up, then apt gave up
    assert system.run(f"test -e {failed}", check=False).returncode == 0
    log = system.run(f"cat {LOG}").stdout
    assert "Sub-process /usr/bin/dpkg returned an error code" in log
    assert re.search(r"^Unpacking \S+ ", log, re.M), log[-3000:]
    assert "Setting up " not in log, log[-3000:]
    system.run(f"rm {hook} {failed}")
    after = system.state()
    # the log stays (it says what happened); nothing else
    assert [line for line in diff_states(pristine, after) if LOG not in line] == []
    assert diff_states(with_hook, after) == [line for line in diff_states(with_hook, after)
                                            if LOG in line or hook in line]
    system.run(f"rm -f {LOG}")


# --- the install, killed three times on the way -------------------------------------------------

# Killed inside dpkg (apt installs the packages, their dependencies and the headers in one run):
# linux-headers' postinst runs /etc/kernel/header_postinst.d (where DKMS hooks
# in); a script there stops dpkg half-way through configuring and says which session it runs in.
DPKG_PAUSE_HOOK = "/etc/kernel/header_postinst.d/00-test-pause"
DPKG_PAUSE_SCRIPT = "#!/bin/sh\nps -o sid= -p $$ > /root/dpkg.sid.new && mv /root/dpkg.sid.new /root/dpkg.sid\nsleep 600\n"


@pytest.mark.parametrize("step", ["dpkg", "apt", "switch"])
def test_install_killed_at_a_step(system, step):
    out = f"/root/killed-{step}.out"
    if step == "dpkg":
        # (the directory is dkms's: the uninstall's purge of dkms takes it away again)
        system.run(f"mkdir -p {DPKG_PAUSE_HOOK.rsplit('/', 1)[0]}")
        system.put(DPKG_PAUSE_SCRIPT.encode(), DPKG_PAUSE_HOOK, mode=0o755)
        env, reached, past = "", "test -s /root/dpkg.sid", "listening on port"
    else:
        env, reached, past = f"MITIGATOR_AGENT_STEP_PAUSE={step}", f"grep -q 'pausing at step {step}' {out}", None
    # its own session and process group, so SIGKILL reaches every process of the install
    system.run(f"(setsid sh -c 'echo $$ > /root/installer.pgid; cat {SCRIPT} | {env} sh'"
               f" > {out} 2>&1 &)")
    deadline = time.monotonic() + INSTALL_TIMEOUT
    while system.run(reached, check=False).returncode != 0:
        text = system.run(f"cat {out}").stdout
        if time.monotonic() > deadline or re.search(r"^mitigator-agent: ", text, re.M) or (past and past in text):
            log = system.run(f"tail -n 60 {LOG}", check=False).stdout
            pytest.fail(f"the install did not reach step {step}:\n{text}\n--- {LOG} (end) ---\n{log}")
        time.sleep(5)
    # SIGKILL: no trap runs, as when the machine loses power or the admin's session dies. apt runs
    # dpkg in a session of its own (its pty): that session goes too. (dash's kill takes no `--`.)
    # Every process of both must be gone before the next run starts.
    system.run('groups="$(cat /root/installer.pgid) $(cat /root/dpkg.sid 2>/dev/null)"; for g in $groups; do'
               f" kill -KILL -$g; done; rm -f /root/installer.pgid /root/dpkg.sid {out} {DPKG_PAUSE_HOOK};"
               " for i in $(seq 60); do alive=no; for g in $groups; do ps -o pid= -g $g >/dev/null && alive=yes;"
               " done; [ $alive = no ] && exit 0; sleep 1; done; ps -ef; exit 1")
    if step == "dpkg":
        # dpkg really stopped half-way: the next run has to finish its work first
        assert system.run("dpkg --audit", check=False).stdout.strip() != ""


def test_install_completes_after_the_kills(system, client_key, tmp_path):
    started = time.monotonic()
    result = install(system)
    record("install (after three killed runs)", result, time.monotonic() - started)
    out = result.stderr
    # the run killed inside dpkg was finished by the next one; the one killed after apt left the
    # packages installed and configured: this run finds them so and completes the rest
    assert f"mitigator-agent {VERSION} is installed and running (Debian packages: tcpsecrets-dkms mitigator-agent)." in out
    assert system.run("dpkg --audit").stdout.strip() == ""
    fingerprint = system.run(f"ssh-keygen -l -f {HOST_KEY}.pub").stdout.split()[1]
    assert re.search(rf"^Host key \(MITIGATOR pins it\): 256 {re.escape(fingerprint)} ", out, re.M)
    assert "    no firewall is active: port 7100 is open to everyone" in out
    for line in ("ok   IPv4 cookie SYN-ACK = the cookie computed from the agent's answer",
                 "ok   IPv6 cookie ACK for a SYN the kernel never saw opened a connection"):
        assert "    " + line in out
    assert last_line(result) == "Update: run this script again. Uninstall: mitigator-agent -d"


def test_a_key_appended_as_root_is_admitted_and_get_matches_the_kernel(system, client_key, tmp_path):
    public = client_key.with_suffix(".pub").read_text().strip()
    system.run(f"echo {shlex.quote(public)} | head -1 >> {KEYS}")
    known_hosts = pin_host_key(system, tmp_path)
    result = ssh_get(system, client_key, known_hosts)
    assert result.returncode == 0, result.stderr
    answer = fields(result.stdout, ": ")
    proc = fields(system.run("cat /proc/tcp_secrets").stdout, " ")
    assert answer["syncookie_secret"] == proc["cookie_secret"]
    assert answer["net_secret"] == proc["net_secret"]


def test_files_users_and_modes_are_as_documented(system):
    out = system.run(f"stat -c '%n %U:%G %a' /opt/mitigator_agent {KEYS} {HOST_KEY} {HOST_KEY}.pub "
                     "/usr/lib/mitigator-agent/install.sh /var/lib/mitigator-agent /var/lib/mitigator-agent-install"
                     ).stdout.splitlines()
    assert out == ["/opt/mitigator_agent mitigator_agent:mitigator_agent 755",
                   f"{KEYS} root:mitigator_agent 640",
                   f"{HOST_KEY} mitigator_agent:mitigator_agent 600",
                   f"{HOST_KEY}.pub mitigator_agent:mitigator_agent 644",
                   "/usr/lib/mitigator-agent/install.sh root:root 755",
                   "/var/lib/mitigator-agent root:root 700",
                   "/var/lib/mitigator-agent-install root:root 700"]
    # the .debs of the installed version, kept for a failed update to go back to
    assert system.run("ls /var/lib/mitigator-agent-install/debs").stdout.split() == [
        "mitigator-agent.deb", "tcpsecrets-dkms.deb"]
    gid = system.run("getent group mitigator_agent | cut -d: -f3").stdout.strip()
    assert system.run("cat /sys/module/tcpsecrets/parameters/read_gid").stdout.strip() == gid
    assert system.run("readlink -f /usr/sbin/mitigator-agent").stdout.strip() == "/usr/lib/mitigator-agent/mitigator-agent"
    assert system.run("dpkg-query -W -f '${Status} ' tcpsecrets-dkms mitigator-agent").stdout.split() == [
        "install", "ok", "installed"] * 2
    main_pid = system.run("systemctl show -p MainPID --value mitigator-agent.service").stdout.strip()
    assert system.run(f"stat -c %U /proc/{main_pid}").stdout.strip() == "mitigator_agent"


def test_systemd_rates_the_unit_at_most_2(system):
    out = system.run("systemd-analyze security mitigator-agent.service --no-pager").stdout
    exposure = float(re.search(r"Overall exposure level for mitigator-agent.service: ([0-9.]+)", out).group(1))
    assert exposure <= MAX_EXPOSURE, out


def test_selftest_and_check_pass_on_the_installed_system(system):
    selftest = system.run("mitigator-agent selftest", check=False)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert len(selftest.stdout.splitlines()) == 4


# --- reboot -------------------------------------------------------------------------------------

def test_everything_comes_back_after_a_reboot(system, client_key, tmp_path):
    host_key = system.get(HOST_KEY)
    system.reboot()
    record("after the reboot", system.run(
        "uptime; lsmod | grep tcpsecrets; cat /sys/module/tcpsecrets/parameters/read_gid; sysctl net.ipv4.tcp_syncookies;"
        " systemctl is-active mitigator-agent; mitigator-agent status", check=False))
    gid = system.run("getent group mitigator_agent | cut -d: -f3").stdout.strip()
    assert system.run("cat /sys/module/tcpsecrets/parameters/read_gid").stdout.strip() == gid
    assert system.run("sysctl -n net.ipv4.tcp_syncookies").stdout.strip() == "2"
    system.run("for i in $(seq 120); do ss -Hltn 'sport = :7100' | grep -q . && exit 0; sleep 1; done; exit 1")
    assert system.run("systemctl is-active mitigator-agent").stdout.strip() == "active"
    assert system.get(HOST_KEY) == host_key
    result = ssh_get(system, client_key, pin_host_key(system, tmp_path))
    record_poll(result)
    assert result.returncode == 0, result.stderr


# --- update -------------------------------------------------------------------------------------

def test_a_failed_update_leaves_the_previous_version_running(system):
    # The new version's module cannot build (its kernel's build tree is gone, as when the headers
    # were removed by hand): the update stops before apt and changes nothing. (DKMS's package scripts
    # would skip that kernel and call it success, the old module gone from disk.)
    release = system.run("uname -r").stdout.strip()
    build = f"/lib/modules/{release}/build"
    before = system.state()
    system.run(f"mv {build} /root/build-away")
    try:
        result = install(system, NEXT_SCRIPT, pipe=False, check=False)
    finally:
        system.run(f"mv /root/build-away {build}")
    record("update that fails (the kernel's build tree moved away)", result)
    assert result.returncode == 1, result.stderr
    assert f"[i] updating {VERSION} to {NEXT_VERSION}" in result.stderr
    assert f"[!] update failed: the previous version ({VERSION}) keeps running" in result.stderr
    assert last_line(result) == (f"mitigator-agent: building the module for kernel {release} failed (the compiler's"
                                 f" output: {LOG}): check that linux-headers-{release} is installed whole"
                                 f" (apt install --reinstall linux-headers-{release}), then run this again")
    assert system.run("cat /sys/module/tcpsecrets/version").stdout.strip() == VERSION
    assert system.run("systemctl is-active mitigator-agent").stdout.strip() == "active"
    assert system.run("mitigator-agent --version").stdout.strip() == f"mitigator-agent, version {VERSION}"
    assert re.findall(r"^tcpsecrets/([^,:]+)", system.run("dkms status").stdout, re.M) == [VERSION]
    # nothing else changed: the install log says what happened (and the running agent may have
    # written the sources it remembers, on its own schedule)
    assert [line for line in diff_states(before, system.state())
            if LOG not in line and f" {AGENT_STATE}" not in line] == []


def test_update_keeps_keys_and_host_key_and_serves_the_new_version(system, client_key, tmp_path):
    kept = {path: system.get(path) for path in (KEYS, HOST_KEY, HOST_KEY + ".pub")}
    known_hosts = pin_host_key(system, tmp_path)
    started = time.monotonic()
    # MITIGATOR polls on through the update: the restart and the module swap refuse none.
    with PollingThrough(ssh_get_command(system, client_key, known_hosts)) as polling:
        result = install(system, NEXT_SCRIPT, pipe=False)
    record("update", result, time.monotonic() - started)
    record("polls through the update", subprocess.CompletedProcess("PollingThrough", 0, polling.summary() + "\n", ""))
    assert polling.polls and polling.failed == [], polling.summary() + f": {polling.failed}"
    assert f"[i] updating {VERSION} to {NEXT_VERSION}" in result.stderr
    assert f"mitigator-agent {NEXT_VERSION} is installed and running (Debian packages" in result.stderr
    assert {path: system.get(path) for path in kept} == kept
    assert system.run("mitigator-agent --version").stdout.strip() == f"mitigator-agent, version {NEXT_VERSION}"
    assert system.run("cat /sys/module/tcpsecrets/version").stdout.strip() == NEXT_VERSION
    dkms = system.run("dkms status").stdout
    assert re.findall(r"^tcpsecrets/([^,:]+)", dkms, re.M) == [NEXT_VERSION], dkms
    assert system.run("dpkg-query -W -f '${Version} ' tcpsecrets-dkms mitigator-agent").stdout.split() == [
        f"{NEXT_VERSION}-1"] * 2
    result = ssh_get(system, client_key, pin_host_key(system, tmp_path))
    record_poll(result)
    assert result.returncode == 0, result.stderr


# --- uninstall ----------------------------------------------------------------------------------

def test_uninstall_keeps_keys_then_purge_leaves_nothing(system, pristine):
    kept = {path: system.get(path) for path in (KEYS, HOST_KEY)}
    result = system.run("mitigator-agent -d", timeout=INSTALL_TIMEOUT)
    record("uninstall", result)
    assert "[i] kept: /opt/mitigator_agent/keys and the host key /opt/mitigator_agent/host.ed25519" in result.stderr
    assert last_line(result) == "mitigator-agent is uninstalled."
    assert {path: system.get(path) for path in kept} == kept
    # left: the agent's home, its user and group (in the account databases too), and the package
    # removed, not purged: dpkg's record that its purge is due (it removes them), with the units'
    # enablement, which Debian keeps as configuration until the purge (links to the removed units,
    # inert: nothing is started through them)
    accounts = ("/etc/passwd:", "/etc/group:", "/etc/shadow:", "/etc/gshadow:")
    removed_package = re.compile(r"\+ packages mitigator-agent: .*config-files.*|\+ files /etc/systemd/system/"
                                 r"[a-z.-]+\.wants/(mitigator-agent\.(service|socket)): symlink 0777 root:root ->"
                                 r" /lib/systemd/system/\1")
    left = [line for line in diff_states(pristine, system.state()) if LOG not in line]
    unexpected = [line for line in left if "mitigator_agent" not in line and not any(f" {db}" in line for db in accounts)
                  and not removed_package.fullmatch(line)]
    assert left and unexpected == [], "\n".join(unexpected)

    # At a terminal --purge asks first (the host key MITIGATOR pins goes for good): any answer but
    # "purge" removes nothing. (script(1) gives the command a terminal; "no" is typed into it.)
    asked = system.run(f"printf 'no\\n' | script -qec 'sh {SCRIPT} -d --purge' /dev/null", check=False,
                       timeout=INSTALL_TIMEOUT)
    record("uninstall --purge at a terminal, answered no", asked)
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "Type purge to go on" in asked.stdout and "nothing removed (answered 'no')" in asked.stdout
    assert {path: system.get(path) for path in kept} == kept

    result = system.run(f"sh {SCRIPT} -d --purge", timeout=INSTALL_TIMEOUT)  # no terminal: no question
    record("uninstall --purge", result)
    assert last_line(result) == "mitigator-agent is uninstalled."
    assert diff_states(pristine, system.state()) == []

    again = system.run(f"sh {SCRIPT} -d")
    record("uninstall again", again)
    assert last_line(again) == "mitigator-agent: nothing to remove (not installed)"
