"""Connection limits: per-source rate, unauthenticated cap, login grace time."""

from __future__ import annotations

import socket
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
