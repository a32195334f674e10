"""The agent as a daemon (issue 9, "Daemon" and "Crypto posture"): SIGHUP, core dumps, algorithms.

Real agents on port 0, real OpenSSH clients; the process is inspected from
outside, through /proc, as an attacker on the same host would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import WAIT_SECONDS, AgentProcess

# --- SIGHUP --------------------------------------------------------------------------


def write_config(workdir: Path, text: str) -> Path:
    path = workdir / "agent.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_sighup_reloads_the_config_logs_it_and_keeps_serving(start_agent, client_key, workdir):
    # Before: SIGHUP killed the agent (exit 129, no log line), and systemd's
    # Restart=on-failure does not restart that.
    config = write_config(workdir, "max-unauthenticated-per-source = 4\n")
    # A login timeout no test comes near: the idle connection below must stay.
    agent = start_agent(client_key.public_line + "\n", "--config", str(config), "--login-timeout", "3600")
    start = agent.mark()
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for(r"^INFO reloaded keys=1 config=reloaded changed=nothing$", start)
    assert agent.process.poll() is None
    # From ::1: 127.0.0.1 must stay a stranger (a source that polled is MITIGATOR's, knownsources.py).
    assert agent.ssh(client_key, "get", host="::1").returncode == 0

    write_config(workdir, "max-unauthenticated-per-source = 1\n")
    start = agent.mark()
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for(r"^INFO reloaded keys=1 config=reloaded changed=max_unauthenticated_per_source$", start)
    with socket.create_connection(("127.0.0.1", agent.port("127.0.0.1")), timeout=WAIT_SECONDS) as idle:
        assert idle.recv(256).startswith(b"SSH-2.0-")
        assert agent.ssh(client_key, "get").returncode == 255  # the new cap is in force
        agent.wait_for(r'refused src=127.0.0.1:\d+ request=connection'
                       r' reason="too many unauthenticated connections from 127.0.0.1 \(1\)"', start)
    assert agent.ssh(client_key, "get", host="::1").returncode == 0


def test_sighup_with_a_broken_config_keeps_the_previous_settings(start_agent, client_key, workdir):
    config = write_config(workdir, "login-timeout = 10\n")
    agent = start_agent(client_key.public_line + "\n", "--config", str(config))
    write_config(workdir, "login-timeout = 10\nno-such-setting = 1\n")
    start = agent.mark()
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for(r"^ERROR reload-failed reason=.*unknown key 'no-such-setting'.* kept=\"previous settings\"$",
                   start)
    agent.wait_for(r"^INFO reloaded keys=1 config=failed changed=nothing$", start)
    assert agent.process.poll() is None
    assert agent.ssh(client_key, "get").returncode == 0


def test_sighup_without_a_config_file_reloads_the_keys_file(start_agent, client_key, second_key):
    agent = start_agent(client_key.public_line + "\n")
    agent.keys_path.write_text(f"{client_key.public_line}\n{second_key.public_line}\n")
    start = agent.mark()
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for(r"^INFO keys-file-loaded path=\S+ keys=2 skipped=0$", start)
    agent.wait_for(r"^INFO reloaded keys=2 config=reloaded changed=nothing$", start)
    assert agent.ssh(second_key, "get").returncode == 0


# --- core dumps -----------------------------------------------------------------------

# Root keeps CAP_SYS_PTRACE, which reads any process: drop every capability
# from both the agent and the prober, so that only PR_SET_DUMPABLE decides.
NO_CAPS: List[str] = (["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
                      if os.geteuid() == 0 else [])
PROBE = "import sys\ntry:\n    open(sys.argv[1], 'rb').read()\nexcept PermissionError:\n    sys.exit(13)\n"


def read_as_same_user(path: str) -> int:
    """Exit status of reading ``path`` as the agent's own user, without capabilities (13: EACCES)."""
    return subprocess.run([*NO_CAPS, sys.executable, "-c", PROBE, path], timeout=WAIT_SECONDS).returncode


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="as root, capabilities are dropped with setpriv (util-linux)")
def test_core_dumps_are_off_in_the_running_agent(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", command_prefix=NO_CAPS)
    assert agent.ssh(client_key, "get").returncode == 0  # secrets have been in its memory
    pid = agent.process.pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() != "setpriv"  # exec'd, not a wrapper
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s+bytes", limits, re.MULTILINE), limits
    # PR_SET_DUMPABLE 0: its memory and environment are closed even to its own uid.
    assert read_as_same_user(f"/proc/{pid}/environ") == 13
    # The probe itself works: a process of the same user that did not opt out is readable.
    with subprocess.Popen([*NO_CAPS, "sleep", str(WAIT_SECONDS)]) as control:
        try:
            assert read_as_same_user(f"/proc/{control.pid}/environ") == 0
        finally:
            control.kill()
    assert "core-dumps-not-disabled" not in agent.log


# --- crypto ---------------------------------------------------------------------------

def offered_by_agent(agent: AgentProcess, client_key) -> Dict[str, str]:
    """The agent's KEXINIT lists as OpenSSH's client prints them (``ssh -vv``)."""
    result = agent.ssh(client_key, "get", options=["-vv"])
    assert result.returncode == 0
    log = result.stderr.decode()
    proposal = log[log.index("peer server KEXINIT proposal"):]
    lists = {}
    for line in proposal.splitlines()[1:11]:
        name, _, value = line.removeprefix("debug2: ").partition(": ")
        lists[name] = value
    lists["server-sig-algs"] = re.search(r"server-sig-algs=<([^>]*)>", log).group(1)
    lists["kex"] = re.search(r"debug1: kex: algorithm: (\S+)", log).group(1)
    return lists


def test_only_the_explicit_algorithm_lists_are_offered(agent, client_key):
    # Before: asyncssh's defaults (nistp and group14-sha1 kex, hmac-sha1,
    # umac, encrypt-and-MAC, zlib: ssh-audit's 9 [fail] and 32 [warn]).
    from asyncssh.kex import get_kex_algs
    offered = offered_by_agent(agent, client_key)
    kex = offered["KEX algorithms"].split(",")
    pq = ["mlkem768x25519-sha256"] if b"mlkem768x25519-sha256" in get_kex_algs() else []
    # curve25519 first; asyncssh appends its own protocol markers after the list.
    assert [alg for alg in kex if not alg.startswith(("ext-info-", "kex-strict-"))] == \
        ["curve25519-sha256", "curve25519-sha256@libssh.org", *pq]
    assert "kex-strict-s-v00@openssh.com" in kex  # Terrapin countermeasure
    assert offered["host key algorithms"] == "ssh-ed25519"
    assert offered["server-sig-algs"] == "ssh-ed25519"
    for direction in ("ctos", "stoc"):
        assert offered[f"ciphers {direction}"] == \
            "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com"
        assert offered[f"MACs {direction}"] == "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com"
        assert offered[f"compression {direction}"] == "none"
    assert offered["kex"] == "curve25519-sha256"  # OpenSSH 9.2 has no mlkem: curve25519 wins


@pytest.mark.parametrize("cipher", ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com"])
def test_openssh_polls_with_each_aes_gcm_cipher(agent, client_key, cipher):
    assert agent.ssh(client_key, "get", options=["-o", f"Ciphers={cipher}"]).returncode == 0


@pytest.mark.parametrize("option", [
    "KexAlgorithms=ecdh-sha2-nistp256,diffie-hellman-group14-sha1,diffie-hellman-group-exchange-sha1",
    "Ciphers=aes128-ctr,aes256-cbc",
    "MACs=hmac-sha1,umac-64@openssh.com",
    "HostKeyAlgorithms=ecdsa-sha2-nistp256,rsa-sha2-256",
])
def test_a_client_insisting_on_anything_else_cannot_connect(agent, client_key, option):
    extra = ["-o", "Ciphers=aes128-ctr"] if option.startswith("MACs") else []  # so that a MAC is needed
    result = agent.ssh(client_key, "get", options=["-o", option, *extra])
    assert result.returncode == 255 and b"no matching" in result.stderr
