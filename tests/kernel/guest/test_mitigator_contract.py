"""The current MITIGATOR (v23.08+) contract, against the real kernel.

Inside a booted test kernel, with the module loaded as an installed agent
would have it. MITIGATOR is played by tests/emulators.py: the v23.08
emulator knows only what the agent's `get` answer (over OpenSSH) says and
the wall clock; the legacy consumer knows only the /proc/tcp_secrets text.
Each check compares what they compute with what the kernel puts on the
wire or accepts:
- cookie SYN-ACK ISN = the wall-clock cookie, IPv4 and IPv6;
- a cookie ACK computed by the emulator opens a connection on a fresh
  listener;
- the cookie SYN-ACK's TSval = ts_off(ts_secret) + wall ms + ~5 s, options
  in its low six bits;
- the legacy consumer's cookies hold in the default (wall) mode too;
- SendSyn-marked SYNs are dropped and counted, in init_net and in a fresh
  namespace; other SYNs are answered;
- `set` replaces the secrets at once, only for the writer group;
- after rmmod the stock (jiffies) cookies are back.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.inet import TCP

from mitigator_agent import cookies
from mitigator_agent.snapshot import SetValues, write_set
from tests.emulators import LegacyConsumer, MitigatorV2308

from . import packets
from .conftest import DEVICE, PROC, agent_home, dmesg, insmod, load, module_loaded, sysctl, unload
from .test_agent_in_guest import WRITER_GID, serve_as_nobody, ssh
from .test_tcpsecrets import NOBODY, READER_GID, snapshot, syn_synack

TS_SYN = dict(mss=1460, options=[("SAckOK", b""), ("Timestamp", (12345, 0)), ("WScale", 7)])


def wall_ms() -> int:
    return time.time_ns() // 10**6


def synack_with_wall_times(version: int, port: int, **syn):
    """(wall ns before, sport, isn, SYN-ACK, wall ns after) for one SYN to `port`."""
    before = time.time_ns()
    sport, isn, synack = syn_synack(version, port, **syn)
    return before, sport, isn, synack, time.time_ns()


def emulated_cookie_ack(emulator, version: int, port: int, mss: int = 1460) -> None:
    """The client's ACK of a cookie SYN-ACK that MITIGATOR sent for us."""
    src, dst = packets.client_address(version), packets.loopback(version)
    sport, isn = packets.random_port(), random.getrandbits(32)
    cookie = emulator.cookie(src, dst, sport, port, isn, mss, time.time_ns())
    packets.send(packets.segment(src, dst, sport, port, flags="A",
                                 seq=(isn + 1) & 0xFFFFFFFF, ack=(cookie + 1) & 0xFFFFFFFF), dst)


@pytest.fixture(scope="module")
def contract() -> Iterator[MitigatorV2308]:
    """A v23.08 emulator fed by one `get` over OpenSSH from the agent in this guest.

    One agent for the tests below that need nothing else (an agent start
    takes seconds under TCG); the module stays loaded with the installer's
    parameters and tcp_syncookies=2 while they run, which they do first.
    """
    unload()
    load(f"read_gid={READER_GID}", f"write_gid={WRITER_GID}")
    syncookies_before = sysctl("tcp_syncookies")
    sysctl("tcp_syncookies", 2)
    state = agent_home("agent-state-")
    agent = serve_as_nobody([READER_GID, WRITER_GID],
                            ["--anycast-instance", "mitigator1", "--state-dir", str(state)])
    port, key, _ = next(agent)
    try:
        polled = ssh(port, key, "get")
        assert polled.returncode == 0, polled.stderr
        yield MitigatorV2308.from_get(polled.stdout)
    finally:
        agent.close()
        shutil.rmtree(state)
        sysctl("tcp_syncookies", syncookies_before)
        unload()


@pytest.mark.parametrize("version", [4, 6])
def test_v2308_synack_isn_is_the_wall_clock_cookie(contract, version):
    with packets.listener(version) as lsock:
        port = lsock.getsockname()[1]
        before, sport, isn, synack, after = synack_with_wall_times(version, port, **TS_SYN)
    src, dst = packets.client_address(version), packets.loopback(version)
    expected = {contract.cookie(src, dst, sport, port, isn, 1460, t) for t in (before, after)}
    assert synack[TCP].seq in expected, f"IPv{version}: the kernel's cookie is not MITIGATOR's"
    # and it is not the stock (jiffies) cookie
    snap = snapshot()
    jiffies_count = snap.jiffies64 // (60 * snap.hz)
    assert synack[TCP].seq != cookies.make_cookie(snap, src, dst, sport, port, isn, 1460, count=jiffies_count)


@pytest.mark.parametrize("version", [4, 6])
def test_v2308_cookie_ack_opens_a_connection_on_a_fresh_listener(contract, version):
    with packets.listener(version) as fresh:
        emulated_cookie_ack(contract, version, fresh.getsockname()[1])
        assert packets.accepts(fresh), f"IPv{version}: MITIGATOR's cookie ACK was refused"


@pytest.mark.parametrize("version", [4, 6])
def test_v2308_tsval_is_wall_clock_plus_ts_secret(contract, version):
    with packets.listener(version) as lsock:
        port = lsock.getsockname()[1]
        before, sport, isn, synack, after = synack_with_wall_times(version, port, **TS_SYN)
    src, dst = packets.client_address(version), packets.loopback(version)
    tsval = dict(synack[TCP].options)["Timestamp"][0]
    # the server's offset is keyed by (its own address, the client's)
    assert contract.tsval_ok(tsval, dst, src, before // 10**6), (
        f"IPv{version}: TSval - ts_off = {(tsval - contract.ts_base(dst, src)) & 0xFFFFFFFF},"
        f" wall ms {before // 10**6}")
    assert contract.ts_options(tsval, dst, src) == {"wscale": 7, "sack": True, "ecn": False}


def test_legacy_consumer_cookies_hold_in_wall_mode(tcpsecrets, syncookies):
    # the legacy text carries the IPv4 cookie keys only: that generation did IPv4
    version = 4
    tcpsecrets()
    syncookies(2)
    legacy = LegacyConsumer.from_text(PROC.read_text())
    with packets.listener(version) as lsock:
        port = lsock.getsockname()[1]
        before, sport, isn, synack, after = synack_with_wall_times(version, port, **TS_SYN)
    src, dst = packets.client_address(version), packets.loopback(version)
    expected = {legacy.cookie(src, dst, sport, port, isn, 1460, t) for t in (before, after)}
    assert synack[TCP].seq in expected, f"IPv{version}: the legacy consumer's cookie differs"
    tsval = dict(synack[TCP].options)["Timestamp"][0]
    assert legacy.tsval_ok(tsval, dst, src, before, after), f"IPv{version}: legacy TSval prediction"
    with packets.listener(version) as fresh:
        emulated_cookie_ack(legacy, version, fresh.getsockname()[1])
        assert packets.accepts(fresh), f"IPv{version}: the legacy consumer's cookie ACK was refused"


def test_jiffies_mode_is_the_stock_counter(tcpsecrets, syncookies):
    tcpsecrets("cookie_clock=jiffies")
    syncookies(2)
    snap = snapshot()
    assert snap.cookie_count == snap.jiffies64 // (60 * snap.hz) and not snap.wall_clock
    assert snap.ts_shift_ms == 0
    with packets.listener(4) as lsock:
        port = lsock.getsockname()[1]
        sport, isn, synack = syn_synack(4, port)
    after = snapshot()
    src, dst = packets.client_address(4), packets.loopback(4)
    assert synack[TCP].seq in {cookies.make_cookie(s, src, dst, sport, port, isn, 1460)
                               for s in (snap, after)}


# SendSyn: MITIGATOR's marked SYNs never reach TCP; every other SYN does.
def answered(version: int, urgptr: int) -> bool:
    src, dst = packets.client_address(version), packets.loopback(version)
    with packets.listener(version) as lsock, packets.capture() as cap:
        port, sport = lsock.getsockname()[1], packets.random_port()
        packets.send(packets.segment(src, dst, sport, port, flags="S", seq=1, urgptr=urgptr,
                                     options=[("MSS", 1460)]), dst)
        return packets.wait_for(cap, version, sport, timeout=1.5) is not None


@pytest.mark.parametrize("where", ["init_net", "fresh netns"])
@pytest.mark.parametrize("version", [4, 6])
def test_sendsyn_marked_syn_is_dropped_and_counted(tcpsecrets, syncookies, version, where):
    tcpsecrets()
    syncookies(2)
    with packets.netns(f"sendsyn{version}") if where != "init_net" else nullcontext() as name:
        there = (lambda: packets.inside(name)) if name else nullcontext
        start = snapshot().sendsyn_dropped
        with there():
            marked = answered(version, urgptr=0x0001)
        assert not marked, "a SendSyn-marked SYN was answered"
        assert snapshot().sendsyn_dropped == start + 1
        for other in (0, 0x0100, 0x0002, 0xFFFF):
            with there():
                unmarked = answered(version, urgptr=other)
            assert unmarked, f"SYN with urgent pointer {other:#06x} dropped"
        assert snapshot().sendsyn_dropped == start + 1


def test_sendsyn_off_answers_marked_syns(tcpsecrets, syncookies):
    tcpsecrets("drop_sendsyn=0")
    syncookies(2)
    assert not snapshot().sendsyn_drop
    assert answered(4, urgptr=0x0001)


# `set`: the whole set at once, only for root and the writer group.
def random_set(**sysctls) -> SetValues:
    values = dict(tcp_ecn=2, tcp_sack=1, tcp_timestamps=1, tcp_window_scaling=1)
    values.update(sysctls)
    return SetValues(net_secret=os.urandom(16), syncookie_secret=os.urandom(32),
                     syncookie6_secret=os.urandom(32), ts_secret=os.urandom(16), **values)


def test_set_replaces_every_secret_and_the_kernel_uses_them(tcpsecrets, syncookies):
    tcpsecrets(f"write_gid={WRITER_GID}")
    syncookies(2)
    ecn_before = sysctl("tcp_ecn")
    values = random_set(tcp_ecn=1 if ecn_before != 1 else 2)
    write_set(str(DEVICE), values)
    snap = snapshot()
    assert (snap.net_secret, snap.syncookie_secret, snap.syncookie6_secret, snap.ts_secret) == (
        values.net_secret, values.syncookie_secret, values.syncookie6_secret, values.ts_secret)
    assert snap.set_generation == 1 and sysctl("tcp_ecn") == values.tcp_ecn
    for version in (4, 6):
        with packets.listener(version) as lsock:
            port = lsock.getsockname()[1]
            sport, isn, synack = syn_synack(version, port)
        src, dst = packets.client_address(version), packets.loopback(version)
        later = snapshot()
        assert synack[TCP].seq in {cookies.make_cookie(s, src, dst, sport, port, isn, 1460)
                                   for s in (snap, later)}
    sysctl("tcp_ecn", ecn_before)


def test_set_is_refused_to_others_and_for_bad_values(tcpsecrets):
    tcpsecrets(f"read_gid={READER_GID}", f"write_gid={WRITER_GID}")
    before = snapshot()
    blob = random_set().to_bytes()
    writer = ["python3", "-c", "import sys,os; fd=os.open('/dev/tcpsecrets', os.O_WRONLY);"
              " os.write(fd, sys.stdin.buffer.read())"]
    refused = subprocess.run(writer, input=blob, capture_output=True, user=NOBODY, group=NOBODY,
                             extra_groups=[READER_GID])
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr
    for bad in (random_set(tcp_ecn=3), random_set(tcp_sack=2), random_set(tcp_timestamps=-1)):
        with pytest.raises(Exception):
            write_set(str(DEVICE), bad)
    short = subprocess.run(writer, input=blob[:-1], capture_output=True)
    assert short.returncode != 0 and b"Invalid argument" in short.stderr
    after = snapshot()
    assert (after.net_secret, after.syncookie_secret, after.ts_secret, after.set_generation) == (
        before.net_secret, before.syncookie_secret, before.ts_secret, 0)
    allowed = subprocess.run(writer, input=blob, capture_output=True, user=NOBODY, group=NOBODY,
                             extra_groups=[WRITER_GID])
    assert allowed.returncode == 0, allowed.stderr
    assert snapshot().set_generation == 1


def test_rmmod_brings_back_the_jiffies_cookies(syncookies):
    unload()
    load()
    tracing = Path("/sys/kernel/debug/tracing/enabled_functions")
    if not tracing.exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    redirected = tracing.read_text()
    for name in ("__cookie_v4_init_sequence", "__cookie_v4_check", "__cookie_v6_init_sequence",
                 "__cookie_v6_check"):
        assert name in redirected, f"{name} is not redirected while loaded"
    snap = snapshot()
    unload()
    assert "__cookie_v4" not in tracing.read_text() and "seq_and_ts_off" not in tracing.read_text()
    syncookies(2)
    for version in (4, 6):
        with packets.listener(version) as lsock:
            port = lsock.getsockname()[1]
            sport, isn, synack = syn_synack(version, port)
        src, dst = packets.client_address(version), packets.loopback(version)
        # the secrets stay (they are the kernel's); the counter is jiffies again
        stock = {cookies.make_cookie(snap, src, dst, sport, port, isn, 1460,
                                     count=(snap.jiffies64 // (60 * snap.hz)) + d) for d in (0, 1)}
        assert synack[TCP].seq in stock, f"IPv{version}: not the stock cookie after rmmod"


def test_set_never_mixes_old_and_new_keys_under_traffic(tcpsecrets, syncookies):
    """SYNs keep coming while two sets alternate: each SYN-ACK is wholly one set's cookie."""
    tcpsecrets(f"write_gid={WRITER_GID}")
    syncookies(2)
    sets = [random_set(), random_set()]
    write_set(str(DEVICE), sets[0])
    base = snapshot()
    snaps = [dataclasses.replace(base, syncookie_secret=s.syncookie_secret) for s in sets]
    stop = threading.Event()
    writes = []

    def alternate() -> None:
        while not stop.is_set():
            write_set(str(DEVICE), sets[len(writes) % 2])
            writes.append(1)

    src, dst = packets.client_address(4), packets.loopback(4)
    mixed, seen = [], {0: 0, 1: 0}
    with packets.listener(4) as lsock:
        port = lsock.getsockname()[1]
        writer = threading.Thread(target=alternate)
        writer.start()
        try:
            for _ in range(60):
                sport, isn, synack = syn_synack(4, port)
                count = snapshot().cookie_count
                matches = [i for i, snap in enumerate(snaps) for c in (count - 1, count)
                           if cookies.make_cookie(snap, src, dst, sport, port, isn, 1460, count=c)
                           == synack[TCP].seq]
                if matches:
                    seen[matches[0]] += 1
                else:
                    mixed.append(synack[TCP].seq)
        finally:
            stop.set()
            writer.join()
    assert not mixed, f"{len(mixed)} SYN-ACKs matched neither set whole"
    assert len(writes) > 10 and seen[0] and seen[1], (len(writes), seen)


def test_bad_clock_parameter_fails_cleanly(tcpsecrets):
    result = insmod("cookie_clock=uptime")
    assert result.returncode != 0
    assert not module_loaded() and not DEVICE.exists() and not PROC.exists()
    assert "tcpsecrets: cookie_clock=uptime is not wall or jiffies" in dmesg()
