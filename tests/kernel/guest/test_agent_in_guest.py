"""The agent on the real /dev/tcpsecrets, as an unprivileged user, polled by OpenSSH.

Inside a booted test kernel: the module is loaded with read_gid naming the
agent's group, `mitigator-agent serve` runs as nobody (no root, no sudo),
and the OpenSSH client fetches `get json`; from that answer alone the test
computes the cookie the kernel then puts in its SYN-ACK.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.inet import TCP

from mitigator_agent import cookies
from mitigator_agent.snapshot import Snapshot

from . import packets
from .conftest import PROC, agent_home, load, sysctl, unload
from .test_tcpsecrets import NOBODY, READER_GID, syn_synack

AGENT = Path(sys.executable).with_name("mitigator-agent")


WRITER_GID = 4243


def serve_as_nobody(groups: list[int], extra_args: list[str] = ()) -> Iterator[tuple[int, Path, subprocess.Popen]]:
    """(port, client key, process) of `mitigator-agent serve` on /dev/tcpsecrets as nobody."""
    home = agent_home("agent-")
    client_key = home / "client"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitigator1", "-f", str(client_key)],
                   check=True)
    keys = home / "keys"
    keys.write_text((home / "client.pub").read_text())
    os.chmod(keys, 0o600)
    os.chown(keys, NOBODY, NOBODY)
    log = home / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(AGENT), "serve", "--listen", "127.0.0.1", "--port", "0", "--keys", str(keys),
             "--host-key", str(home / "host.ed25519"), "--device", "/dev/tcpsecrets", *extra_args],
            user=NOBODY, group=NOBODY, extra_groups=groups, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = wait_for_port(proc, log)
        yield port, client_key, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(home)


@pytest.fixture(scope="module")
def agent() -> Iterator[tuple[int, Path, subprocess.Popen]]:
    """The agent as installed for reading only (module read_gid = its group).

    One agent for this file's tests: starting one costs tens of seconds of
    Python under TCG. Each test leaves the module loaded with these options.
    """
    unload()
    load(f"read_gid={READER_GID}")
    syncookies_before = sysctl("tcp_syncookies")
    sysctl("tcp_syncookies", 2)
    try:
        yield from serve_as_nobody([READER_GID])
    finally:
        sysctl("tcp_syncookies", syncookies_before)
        unload()


def wait_for_port(proc: subprocess.Popen, log: Path) -> int:
    """The port the agent logs once it listens (it exits on a start-up error)."""
    while proc.poll() is None:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"the agent exited with {proc.returncode}:\n{log.read_text()}")


def ssh(port: int, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         "mitigator_agent@127.0.0.1", command],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def snapshot_from_answer(answer: dict) -> Snapshot:
    """What MITIGATOR knows after one poll, as a Snapshot for the cookie code."""
    return Snapshot(
        abi_version=answer["abi_version"], size=answer["snapshot_size"], flags=answer["flags"],
        hz=answer["hz"], realtime_ns=answer["realtime_ns"], tcp_clock_ms=answer["tcp_clock_ms"],
        jiffies64=answer["jiffies"], syncookie_secret=bytes.fromhex(answer["syncookie_secret"]),
        syncookie6_secret=bytes.fromhex(answer["syncookie6_secret"]),
        net_secret=bytes.fromhex(answer["net_secret"]), ts_secret=bytes.fromhex(answer["ts_secret"]),
        tcp_syncookies=answer["tcp_syncookies"], tcp_timestamps=answer["tcp_timestamps"],
        tcp_sack=answer["tcp_sack"], tcp_window_scaling=answer["tcp_window_scaling"],
        tcp_ecn=answer["tcp_ecn"], cookie_count=answer["cookie_count"],
        ts_shift_ms=answer["ts_shift_ms"], set_generation=answer["set_generation"],
        sendsyn_dropped=answer["sendsyn_dropped"])


def test_agent_runs_unprivileged_and_its_answer_predicts_the_kernel_cookie(agent):
    port, key, proc = agent
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{NOBODY}\s+{NOBODY}\s+{NOBODY}\s+{NOBODY}$", status, re.M)
    assert re.search(r"^CapEff:\s+0+$", status, re.M)

    polled = ssh(port, key, "get json")
    assert polled.returncode == 0, polled.stderr
    answer = json.loads(polled.stdout)
    assert answer["kernel_release"] == os.uname().release and answer["cookie_accept"] is True
    assert (answer["uname"], answer["version"], answer["cookie_clock"]) == ("Linux", "26.04", "wall")
    snap = snapshot_from_answer(answer)

    for version in (4, 6):
        with packets.listener(version) as lsock:
            listen_port = lsock.getsockname()[1]
            sport, isn, synack = syn_synack(version, listen_port)
        src, dst = packets.client_address(version), packets.loopback(version)
        # the cookie minute may have turned since the poll: MITIGATOR accepts count and count+1
        expected = {cookies.make_cookie(snap, src, dst, sport, listen_port, isn, 1460, count=c)
                    for c in (snap.cookie_count, snap.cookie_count + 1)}
        assert synack[TCP].seq in expected, f"IPv{version}: agent's secrets do not predict the kernel"


def test_agent_answers_every_command_from_the_device(agent):
    port, key, _ = agent
    legacy = ssh(port, key, "get-tcp-secrets")
    assert legacy.returncode == 0, legacy.stderr
    ours = dict(line.split(" ", 1) for line in legacy.stdout.splitlines())
    kernel = dict(line.split(" ", 1) for line in PROC.read_text().splitlines())
    assert list(ours) == list(kernel)
    for name in ("cookie_secret", "net_secret", "timestamp_secret"):
        assert ours[name] == kernel[name]

    current = ssh(port, key, "get")
    assert current.returncode == 0, current.stderr
    fields = dict(line.split(": ", 1) for line in current.stdout.splitlines())
    assert list(fields)[:11] == ["uname", "version", "time", "net_secret", "syncookie_secret",
                                 "syncookie6_secret", "ts_secret", "tcp_ecn", "tcp_sack",
                                 "tcp_timestamps", "tcp_window_scaling"]
    assert fields["net_secret"] == kernel["net_secret"]
    assert fields["syncookie_secret"] == kernel["cookie_secret"]


def test_agent_follows_the_module_going_and_coming_back(agent):
    port, key, proc = agent
    unload()
    gone = ssh(port, key, "get")
    assert (gone.returncode, gone.stderr) == (2, "tcpsecrets module not loaded\n")
    load(f"read_gid={READER_GID}")
    back = ssh(port, key, "get json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["net_secret"] == PROC.read_text().split("net_secret ", 1)[1][:32]
    assert proc.poll() is None
