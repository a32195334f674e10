"""MITIGATOR keeps polling through a connection flood that never authenticates (issue 9, lock-out).

The issue's attack: idle connections from a few sources held every login
slot and 15 of 15 `ssh ... get` failed.  Here 50 IPv4 sources (127.0.0.10
to .59) each hold an idle connection and a slow banner, reopening them as
the agent closes them, and one IPv6 host cycles through many addresses of
its /64 (fd00:db8:9:1::/64), while MITIGATOR's key, from= its two loopback
addresses, polls with OpenSSH.  Every poll must succeed; only outcomes are
asserted, never how long anything took.  (The same flood against the same
key without from=, a stranger among strangers, let 1 poll of 30 through.)

The agent, the flood and the polls run in a private network namespace:
there the /64's addresses can be added (on the namespace's loopback: a
dummy interface needs a kernel module some hosts lack) without touching
the host.  Needs root, as the integration suite runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from contextlib import ExitStack
from typing import Dict, Iterator, List

import pytest

from conftest import SSH_USER, WAIT_SECONDS, AgentProcess, ClientKey

IP = shutil.which("ip")
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or IP is None,
                                reason="needs root and iproute2 (ip netns)")

FLOODER = Path(__file__).with_name("flood.py")
IPV4_SOURCES = [f"127.0.0.{n}" for n in range(10, 60)]
IPV6_SOURCES = [f"fd00:db8:9:1::{n:x}" for n in range(1, 257)]
POLLS = 30
POLL_GAP_SECONDS = 0.5  # spacing between polls; nothing is asserted about time
LOGIN_TIMEOUT = "4"     # short, so the flood's connections time out and get penalised during the test


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace: loopback up, the IPv6 flooder's /64 on it."""
    name = f"mitigator-flood-{os.getpid()}"
    subprocess.run([IP, "netns", "add", name], check=True, capture_output=True, timeout=WAIT_SECONDS)
    try:
        subprocess.run([IP, "-n", name, "link", "set", "lo", "up"], check=True, timeout=WAIT_SECONDS)
        batch = "".join(f"address add {address}/64 dev lo nodad\n" for address in IPV6_SOURCES)
        subprocess.run([IP, "-n", name, "-batch", "-"], input=batch, text=True, check=True, timeout=WAIT_SECONDS)
        yield name
    finally:
        subprocess.run([IP, "netns", "delete", name], capture_output=True, timeout=WAIT_SECONDS)


def in_netns(netns: str, args: List[str]) -> List[str]:
    assert IP is not None
    return [IP, "netns", "exec", netns, *args]


def poll(agent: AgentProcess, key: ClientKey, netns: str, host: str) -> subprocess.CompletedProcess:
    """One OpenSSH `get` from inside the namespace (host key pinned, as everywhere)."""
    args = in_netns(netns, [*agent.ssh_command(key, host), f"{SSH_USER}@{host}", "get"])
    return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT_SECONDS)


class Flooder:
    """flood.py running in the namespace; ``stop`` returns its counts."""

    def __init__(self, netns: str, host: str, port: int, option: str, sources: List[str]) -> None:
        self.process = subprocess.Popen(
            in_netns(netns, [sys.executable, str(FLOODER), host, str(port), option, *sources]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> Dict[str, int]:
        self.process.send_signal(signal.SIGINT)
        try:
            out, err = self.process.communicate(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:  # never leave a flooder behind
            self.process.kill()
            out, err = self.process.communicate()
        assert self.process.returncode == 0 and out, err
        return json.loads(out)


def test_mitigator_polls_without_a_failure_through_a_flood_from_50_sources_and_a_cycling_64(
        netns, start_agent, client_key):
    agent = start_agent(f'from="127.0.0.1,::1" {client_key.public_line}\n', "--login-timeout", LOGIN_TIMEOUT,
                        command_prefix=in_netns(netns, []))
    counts: Dict[str, Dict[str, int]] = {}
    results: List[subprocess.CompletedProcess] = []
    with ExitStack() as stack:
        # The IPv6 host first: all its addresses count as one source, so
        # the per-source cap (4) is what refuses it.
        ipv6 = Flooder(netns, "::1", agent.port("::1"), "--cycling", IPV6_SOURCES)
        stack.callback(lambda: counts.update(ipv6=ipv6.stop()))
        agent.wait_for(r'request=connection reason="too many unauthenticated connections'
                       r' from fd00:db8:9:1::/64 \(4\)"')
        ipv4 = Flooder(netns, "127.0.0.1", agent.port("127.0.0.1"), "--per-source", IPV4_SOURCES)
        stack.callback(lambda: counts.update(ipv4=ipv4.stop()))
        # Then every stranger slot is held before the first poll.
        agent.wait_for(r'request=connection reason="too many unauthenticated connections \(16\)"')
        for n in range(POLLS):
            results.append(poll(agent, client_key, netns, ("127.0.0.1", "::1")[n % 2]))
            time.sleep(POLL_GAP_SECONDS)
        # The flood went on all along: its sources got penalised, all of the /64 as one.
        agent.wait_for(r"source-penalised src=fd00:db8:9:1::/64 offence=grace-exceeded ")
        agent.wait_for(r"source-penalised src=127\.0\.0\.\d+ offence=grace-exceeded ")
        assert ipv6.process.poll() is None and ipv4.process.poll() is None
    failed = [(r.returncode, r.stderr.decode(errors="replace").strip()) for r in results if r.returncode != 0]
    print(f"flood: {counts}; polls: {len(results) - len(failed)} of {len(results)} ok")
    assert failed == [], failed
    assert all(r.stdout.startswith(b"uname: Linux\n") for r in results)
    # Many more connections than the agent has slots, most of them refused.
    assert counts["ipv4"]["connects"] > 10 * 16 and counts["ipv4"]["dropped"] > 0, counts
    assert counts["ipv6"]["dropped"] > 0, counts
    assert agent.count(rf"poll src=\S+ user={SSH_USER} instance=mitigator1 .*command=get status=0 ") == POLLS
