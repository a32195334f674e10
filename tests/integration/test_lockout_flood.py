"""MITIGATOR keeps polling through a connection flood that never authenticates (issues 9 and 19, lock-out).

The issue's attack: idle connections from many sources hold every login slot.  Here 50 IPv4
sources (127.0.0.10 to .59) each hold an idle connection and a slow banner, reopening them as the
agent closes them, and one IPv6 site cycles through addresses of 256 /64s of its /48
(fd00:db8:9::/48), while MITIGATOR's key polls with OpenSSH.  Only outcomes are asserted, never
how long anything took.

- With from= naming MITIGATOR's two loopback addresses: every poll succeeds.
- Set up as the README says (the key appended, no from=, no --allow), once MITIGATOR has polled:
  every poll succeeds (its sources are known, knownsources.py).  Before issue 19, 53 of 80 such
  polls failed.
- The same flood starting before MITIGATOR's first poll: its sources are strangers among
  strangers until one poll gets through; measured, and each source must get in in the end.

The agent, the flood and the polls run in a private network namespace: there the /48's addresses
can be added (on the namespace's loopback: a dummy interface needs a kernel module some hosts
lack) without touching the host.  Needs root, as the integration suite runs.
"""

from __future__ import annotations

import json
import os
import re
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
IPV6_SOURCES = [f"fd00:db8:9:{n:x}::1" for n in range(1, 257)]  # 256 /64s of one /48
POLLS = 30
POLL_GAP_SECONDS = 0.5  # spacing between polls; nothing is asserted about time
LOGIN_TIMEOUT = "4"     # short, so the flood's connections time out and get penalised during the test


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace: loopback up, the IPv6 flooder's addresses on it."""
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


def flood(stack: ExitStack, agent: AgentProcess, netns: str, counts: Dict[str, Dict[str, int]]) -> None:
    """Start the flood and wait until it holds every stranger slot; stopped (counts kept) by ``stack``."""
    # The IPv6 site first: all its addresses count as one source, so the per-source cap (4) refuses it.
    ipv6 = Flooder(netns, "::1", agent.port("::1"), "--cycling", IPV6_SOURCES)
    stack.callback(lambda: counts.update(ipv6=ipv6.stop()))
    agent.wait_for(r'request=connection reason="too many unauthenticated connections from fd00:db8:9::/48 \(4\)"')
    ipv4 = Flooder(netns, "127.0.0.1", agent.port("127.0.0.1"), "--per-source", IPV4_SOURCES)
    stack.callback(lambda: counts.update(ipv4=ipv4.stop()))
    agent.wait_for(r'request=connection reason="too many unauthenticated connections \(16\)"')


def polls_through_the_flood(agent: AgentProcess, key: ClientKey, netns: str) -> List[subprocess.CompletedProcess]:
    """POLLS polls, alternating 127.0.0.1 and ::1, while the flood goes on; then its penalties are checked."""
    results = []
    for n in range(POLLS):
        results.append(poll(agent, key, netns, ("127.0.0.1", "::1")[n % 2]))
        time.sleep(POLL_GAP_SECONDS)
    # The flood went on all along: its sources got penalised, all of the /48 as one.
    agent.wait_for(r"source-penalised src=fd00:db8:9::/48 offence=grace-exceeded ")
    agent.wait_for(r"source-penalised src=127\.0\.0\.\d+ offence=grace-exceeded ")
    return results


def assert_every_poll_answered(results: List[subprocess.CompletedProcess], counts: Dict[str, Dict[str, int]],
                               agent: AgentProcess, label: str) -> None:
    failed = [(r.returncode, r.stderr.decode(errors="replace").strip()) for r in results if r.returncode != 0]
    print(f"{label}: flood {counts}; polls: {len(results) - len(failed)} of {len(results)} ok")
    assert failed == [], failed
    assert all(r.stdout.startswith(b"uname: Linux\n") for r in results)
    # Many more connections than the agent has slots, most of them refused.
    assert counts["ipv4"]["connects"] > 10 * 16 and counts["ipv4"]["dropped"] > 0, counts
    assert counts["ipv6"]["dropped"] > 0, counts


def test_mitigator_polls_without_a_failure_through_a_flood_from_50_sources_and_a_48(netns, start_agent, client_key):
    agent = start_agent(f'from="127.0.0.1,::1" {client_key.public_line}\n', "--login-timeout", LOGIN_TIMEOUT,
                        command_prefix=in_netns(netns, []))
    counts: Dict[str, Dict[str, int]] = {}
    with ExitStack() as stack:
        flood(stack, agent, netns, counts)
        results = polls_through_the_flood(agent, client_key, netns)
    assert_every_poll_answered(results, counts, agent, "from=")
    assert agent.count(rf"poll src=\S+ user={SSH_USER} instance=mitigator1 .*command=get status=0 ") == POLLS


def test_the_readme_setup_loses_no_poll_once_mitigator_has_polled(netns, start_agent, client_key):
    """The key as the README adds it: no from=, no --allow. The sources it polled from are reserved."""
    agent = start_agent(f"{client_key.public_line}\n", "--login-timeout", LOGIN_TIMEOUT,
                        command_prefix=in_netns(netns, []))
    for host in ("127.0.0.1", "::1"):  # MITIGATOR's first polls, before any flood
        assert poll(agent, client_key, netns, host).returncode == 0
        agent.wait_for(rf"source-remembered src={re.escape(host)} key={re.escape(client_key.fingerprint)}"
                       " instance=mitigator1 ")
    counts: Dict[str, Dict[str, int]] = {}
    with ExitStack() as stack:
        flood(stack, agent, netns, counts)
        results = polls_through_the_flood(agent, client_key, netns)
    assert_every_poll_answered(results, counts, agent, "README setup, after a first poll")
    assert agent.count(rf"poll src=\S+ user={SSH_USER} instance=mitigator1 .*command=get status=0 ") == POLLS + 2


# Polls a source may need, with the flood already holding every slot, before the flood's own penalties
# make room: measured 7 to 28 polls (0.5 s apart, alternating two sources) on an idle machine; a
# bound well above that, so that a loaded machine only makes the test slower.
FIRST_POLL_BOUND = 240
POLLS_AFTER_FIRST = 10


def test_the_readme_setup_under_a_flood_from_before_the_first_poll_gets_in_and_then_stays(
        netns, start_agent, client_key):
    """Measured: MITIGATOR starts polling into a flood that already holds every slot.

    Until one poll of a source gets through, that source is a stranger among strangers; the
    flood's penalties keep giving slots back, and once in, the source is reserved.  Each source
    must get in, and every one of its next POLLS_AFTER_FIRST polls must succeed.
    """
    agent = start_agent(f"{client_key.public_line}\n", "--login-timeout", LOGIN_TIMEOUT,
                        command_prefix=in_netns(netns, []))
    counts: Dict[str, Dict[str, int]] = {}
    outcomes: Dict[str, List[int]] = {"127.0.0.1": [], "::1": []}
    started = time.monotonic()
    first_ok: Dict[str, float] = {}
    with ExitStack() as stack:
        flood(stack, agent, netns, counts)
        for n in range(FIRST_POLL_BOUND):
            host = ("127.0.0.1", "::1")[n % 2]
            codes = outcomes[host]
            if 0 in codes and len(codes) - codes.index(0) > POLLS_AFTER_FIRST:
                if all(0 in c and len(c) - c.index(0) > POLLS_AFTER_FIRST for c in outcomes.values()):
                    break
                continue
            codes.append(poll(agent, client_key, netns, host).returncode)
            if codes[-1] == 0 and host not in first_ok:
                first_ok[host] = time.monotonic() - started
            time.sleep(POLL_GAP_SECONDS)
    for host, codes in outcomes.items():
        print(f"flood before the first poll, {host}: first success at poll {codes.index(0) + 1 if 0 in codes else None}"
              f" ({first_ok.get(host, float('nan')):.0f} s into the flood), {codes.count(0)} of {len(codes)} ok;"
              f" flood {counts}")
        assert 0 in codes, f"{host} never got in: {codes}"
        assert set(codes[codes.index(0):]) == {0}, f"{host} lost polls after it was known: {codes}"
