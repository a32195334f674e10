"""Admission before authentication against the running agent (issue 9).

Sources are loopback addresses: every 127.0.0.0/8 address is local on Linux,
so a client bound to 127.0.0.2 is another source than one on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from contextlib import ExitStack
from typing import List, Optional

import asyncssh
import pytest

from conftest import AGENT, SSH_USER, WAIT_SECONDS, AgentProcess, ClientKey, make_client_key

# Idle connections must stay open for the whole test, however slow the
# machine: a login timeout no test comes near.
HOLD = ("--login-timeout", "3600")
ATTEMPTS = 20  # upper bound on attempts in loops that wait for an outcome


def open_raw(agent: AgentProcess, source: str, host: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` that never authenticates; returns once the banner came."""
    sock = socket.create_connection((host, agent.port(host)), timeout=WAIT_SECONDS, source_address=(source, 0))
    assert sock.recv(256).startswith(b"SSH-2.0-mitigator_agent")
    return sock


def ssh_from(agent: AgentProcess, key: ClientKey, source: str) -> subprocess.CompletedProcess:
    """OpenSSH `get` from the loopback address ``source`` (BindAddress)."""
    return agent.ssh(key, "get", options=["-o", f"BindAddress={source}"])


def asyncssh_from(agent: AgentProcess, keys: List[asyncssh.SSHKey], source: str) -> Optional[Exception]:
    """One login attempt with asyncssh from ``source``; the exception it ended with, if any."""
    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.port("127.0.0.1"), username=SSH_USER,
                                    client_keys=keys, local_addr=(source, 0),
                                    known_hosts=str(agent.known_hosts), agent_path=None, config=None) as conn:
            await conn.run("get", check=True)
    try:
        asyncio.run(asyncio.wait_for(run(), WAIT_SECONDS))
    except (asyncssh.Error, OSError) as exc:
        return exc
    return None


def test_strangers_filling_every_slot_do_not_lock_out_a_key_with_from(start_agent, client_key):
    # The lock-out: idle connections from a few sources took the
    # shared cap and every `ssh ... get` failed.  MITIGATOR's source, named
    # by from=, has slots of its own.
    agent = start_agent(f'from="127.0.0.1" {client_key.public_line}\n', "--max-unauthenticated", "2",
                        "--max-unauthenticated-per-source", "1", *HOLD)
    with ExitStack() as stack:
        stack.enter_context(open_raw(agent, "127.0.0.2"))
        stack.enter_context(open_raw(agent, "127.0.0.3"))
        start = agent.mark()
        refused = ssh_from(agent, client_key, "127.0.0.4")
        assert refused.returncode == 255 and refused.stdout == b""
        agent.wait_for(r'refused src=127.0.0.4:\d+ request=connection'
                       r' reason="too many unauthenticated connections \(2\)"', start)
        for _ in range(3):
            assert ssh_from(agent, client_key, "127.0.0.1").returncode == 0


def test_allow_list_sources_have_the_same_pool(start_agent, client_key):
    agent = start_agent(f"{client_key.public_line}\n", "--max-unauthenticated", "1",
                        "--allow", "127.0.0.9/32", *HOLD)
    with open_raw(agent, "127.0.0.2"):
        assert ssh_from(agent, client_key, "127.0.0.3").returncode == 255
        assert ssh_from(agent, client_key, "127.0.0.9").returncode == 0


def test_a_from_star_key_names_nobody_so_strangers_stay_strangers(start_agent, client_key):
    agent = start_agent(f'from="*" {client_key.public_line}\n', "--max-unauthenticated", "1", *HOLD)
    with open_raw(agent, "127.0.0.2"):
        start = agent.mark()
        assert ssh_from(agent, client_key, "127.0.0.3").returncode == 255
        agent.wait_for(r'refused src=127.0.0.3:\d+ request=connection'
                       r' reason="too many unauthenticated connections \(1\)"', start)
    assert ssh_from(agent, client_key, "127.0.0.3").returncode == 0


def test_failed_logins_penalise_their_source_for_a_growing_time_and_no_one_else(start_agent, client_key,
                                                                                workdir):
    agent = start_agent(f"{client_key.public_line}\n")
    stranger = make_client_key(workdir, "stranger").key
    # 5 s owed per failed authentication, refused once more than 15 s are
    # owed: four quick failures do it.  Owed time also runs off, so on a
    # slow machine it takes more: attempt until the agent says so.
    for _ in range(ATTEMPTS):
        # PermissionDenied; or, once penalised, the connection dropped.
        assert asyncssh_from(agent, [stranger], "127.0.0.2") is not None
        if agent.count(r"source-penalised src=127.0.0.2 "):
            break
    # Logged by the offence that crossed the threshold: more than 15 s, at most 20.
    agent.wait_for(r"source-penalised src=127.0.0.2 offence=authfail penalty_s=(1[5-9]|20) refused_s=\d+$")
    # Now dropped before the banner.  (If the time ran off meanwhile, on a
    # slow machine, fail once more: that owes 5 s again.)  The log line may
    # be held back by the per-source refusal budget, so the client's view
    # is what is checked.
    for _ in range(ATTEMPTS):
        with socket.create_connection(("127.0.0.1", agent.port("127.0.0.1")), timeout=WAIT_SECONDS,
                                      source_address=("127.0.0.2", 0)) as sock:
            try:
                banner = sock.recv(256)
            except ConnectionResetError:
                banner = b""
        if not banner:
            break
        asyncssh_from(agent, [stranger], "127.0.0.2")
    assert banner == b""
    assert ssh_from(agent, client_key, "127.0.0.1").returncode == 0  # nobody else is penalised


def test_strict_allow_drops_strangers_before_the_banner(start_agent, client_key):
    agent = start_agent(f"{client_key.public_line}\n", "--strict-allow", "--allow", "127.0.0.1")
    start = agent.mark()
    sock = socket.create_connection(("127.0.0.1", agent.port("127.0.0.1")), timeout=WAIT_SECONDS,
                                    source_address=("127.0.0.2", 0))
    with sock:
        try:
            assert sock.recv(256) == b""  # closed, not a byte of SSH
        except ConnectionResetError:
            pass
    agent.wait_for(r'refused src=127.0.0.2:\d+ request=connection'
                   r' reason="not in the allow list \(strict-allow\)"', start)
    assert ssh_from(agent, client_key, "127.0.0.1").returncode == 0


@pytest.mark.parametrize("value, reason", [
    ("0.0.0.0/0", "allows every address"),
    ("::/0", "allows every address"),
    ("mitigator.example", "is not an IP address or CIDR"),
    ("192.0.2.300", "is not an IP address or CIDR"),
])
def test_allow_refuses_what_is_not_a_particular_network(workdir, value, reason):
    result = subprocess.run([AGENT, "serve", "--allow", value, "--keys", str(workdir / "keys")],
                            capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert result.returncode == 2 and "--allow" in result.stderr and f"'{value}' {reason}" in result.stderr


def test_a_source_that_polled_is_still_reserved_after_a_restart(start_agent, client_key, workdir):
    """known-sources.json (state dir, 0600) carries MITIGATOR's sources over a restart of the agent."""
    keys = client_key.public_line + "\n"
    first = start_agent(keys, "--max-unauthenticated", "1", "--login-timeout", "3600")
    assert first.ssh(client_key, "get").returncode == 0
    first.wait_for(r"source-remembered src=127\.0\.0\.1 ")
    first.stop()
    known = workdir / "state" / "known-sources.json"
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    assert [(s["address"], s["key"], s["instance"]) for s in json.loads(known.read_text())["sources"]] == [
        ("127.0.0.1", client_key.fingerprint, "mitigator1")]
    again = start_agent(None, "--max-unauthenticated", "1", "--login-timeout", "3600")
    with socket.create_connection(("::1", again.port("::1")), timeout=WAIT_SECONDS) as stranger:
        assert stranger.recv(256).startswith(b"SSH-2.0-")  # holds the only stranger slot
        assert again.ssh(client_key, "get").returncode == 0  # 127.0.0.1: known, its own pool
        refused = again.ssh(client_key, "get", options=["-b", "127.0.0.2"])  # the same key, a new source
        assert refused.returncode == 255
        again.wait_for(r'refused src=127\.0\.0\.2:\d+ request=connection reason="too many unauthenticated'
                       r' connections \(1\)"')
    assert again.count(r"source-remembered src=127\.0\.0\.1 ") == 0  # known already: nothing new to say


def test_a_removed_key_takes_its_sources_reservation_with_it(start_agent, client_key, second_key):
    agent = start_agent(client_key.public_line + "\n" + second_key.public_line + "\n",
                        "--max-unauthenticated", "1", "--login-timeout", "3600")
    assert agent.ssh(client_key, "get").returncode == 0
    agent.wait_for(r"source-remembered src=127\.0\.0\.1 ")
    agent.keys_path.write_text(second_key.public_line + "\n")  # mitigator1's key removed
    with socket.create_connection(("::1", agent.port("::1")), timeout=WAIT_SECONDS) as stranger:
        assert stranger.recv(256).startswith(b"SSH-2.0-")
        # 127.0.0.1 polled with a key that is gone: a stranger again, and the stranger slot is taken.
        assert agent.ssh(second_key, "get").returncode == 255
    assert agent.ssh(second_key, "get").returncode == 0


def test_a_keys_file_the_agent_refuses_costs_the_polling_source_no_penalty(start_agent, client_key):
    """The file's fault (here: others may write it), not MITIGATOR's: its polls fail, it is not penalised."""
    agent = start_agent(client_key.public_line + "\n")
    agent.keys_path.chmod(0o666)
    for _ in range(6):  # 6 x 5 s of authfail would refuse the source for 15 s
        assert agent.ssh(client_key, "get").returncode == 255
    agent.wait_for(r'keys-file-admits-nobody reason="keys file \S+ is writable by group or others \(mode 0666\)"'
                   r' fix="run chmod go-w \S+"')
    assert agent.count("keys-file-admits-nobody") == 1  # one clear line, not one per poll
    agent.keys_path.chmod(0o644)
    assert agent.ssh(client_key, "get").returncode == 0  # fixed: in at once, nothing owed
    assert agent.count("source-penalised") == 0
