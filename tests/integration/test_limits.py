"""Connection limits: per-source rate, unauthenticated cap, login grace time."""

from __future__ import annotations

import socket
import subprocess
from contextlib import ExitStack

from conftest import WAIT_SECONDS

# Idle connections must stay open for the whole test, however slow the
# machine: a login timeout no test comes near.
HOLD = ("--login-timeout", "3600")


def open_raw(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection that never authenticates; returns once the agent sent its banner."""
    sock = socket.create_connection((host, port), timeout=WAIT_SECONDS)
    assert sock.recv(256).startswith(b"SSH-2.0-mitigator_agent")
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_rate_limit_per_source_address(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--burst", "2", "--rate", "0.0001")
    for _ in range(2):
        open_raw(agent.port("127.0.0.1")).close()  # a stranger: it never authenticates
    refused = agent.ssh(client_key, "get")
    assert refused.returncode == 255 and refused.stdout == b""
    agent.wait_for(r'refused src=127.0.0.1:\d+ request=connection reason="rate limit: over 2 connections')
    # Another source address has its own bucket.
    assert agent.ssh(client_key, "get", host="::1").returncode == 0
    # And a source that polled with a listed key is MITIGATOR's from then on (knownsources.py): no bucket.
    agent.wait_for(r"source-remembered src=::1 ")
    for _ in range(3):
        assert agent.ssh(client_key, "get", host="::1").returncode == 0


def test_unauthenticated_connections_capped(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--max-unauthenticated", "2", *HOLD)
    port = agent.port("127.0.0.1")
    with ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(open_raw(port))
        start = agent.mark()
        refused = agent.ssh(client_key, "get")
        assert refused.returncode == 255 and refused.stdout == b""
        agent.wait_for(r'request=connection reason="too many unauthenticated connections \(2\)"', start)
        start = agent.mark()
    agent.wait_for_all(r'request=login reason="closed before authenticating"', 2, start)
    assert agent.ssh(client_key, "get").returncode == 0


def test_unauthenticated_connections_capped_per_source(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--max-unauthenticated-per-source", "1", *HOLD)
    with open_raw(agent.port("127.0.0.1")):
        refused = agent.ssh(client_key, "get")
        assert refused.returncode == 255 and refused.stdout == b""
        # The reason names the unit strangers are counted in: the IPv4
        # address here, the /64 for IPv6 (ratelimit.source_bucket).
        agent.wait_for(r'refused src=127.0.0.1:\d+ request=connection'
                       r' reason="too many unauthenticated connections from 127.0.0.1 \(1\)"')
        assert agent.ssh(client_key, "get", host="::1").returncode == 0  # other sources unaffected


def test_login_grace_timeout_closes_idle_connection(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--login-timeout", "0.5")
    with open_raw(agent.port("::1"), "::1") as idle:
        read_until_closed(idle)  # returns only because the agent hung up
    agent.wait_for(r'refused src=\[::1\]:\d+ request=login reason="closed before authenticating"'
                   r' detail="Login timeout expired"')
    assert agent.ssh(client_key, "get", host="::1").returncode == 0


def test_an_authenticated_connection_with_no_session_is_closed_after_the_idle_timeout(start_agent, client_key):
    """`ssh -N` (or a forgotten master connection) does not hold a connection open forever."""
    agent = start_agent(client_key.public_line + "\n", "--idle-timeout", "1")
    held = subprocess.run([*agent.ssh_command(client_key), "-N", "mitigator_agent@127.0.0.1"],
                          capture_output=True, timeout=WAIT_SECONDS)  # returns only because the agent hung up
    assert held.returncode == 255
    agent.wait_for(r'closed src=127\.0\.0\.1:\d+ user=mitigator_agent instance=mitigator1 key=\S+'
                   r' reason="idle for 1 s with no session open"')
    # A connection that runs a command is not idle: a poll right away is answered.
    assert agent.asyncssh_run(client_key, "get").exit_status == 0


def test_idle_timeout_0_never_closes(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--idle-timeout", "0")
    with subprocess.Popen([*agent.ssh_command(client_key), "-N", "mitigator_agent@127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as held:
        agent.wait_for(r"source-remembered src=127\.0\.0\.1 ")
        try:
            held.wait(3)
        except subprocess.TimeoutExpired:
            pass
        assert held.poll() is None  # still connected
        held.terminate()
    assert agent.count("idle for") == 0
