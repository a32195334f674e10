"""``mitigator-agent selftest``: prove on this server what MITIGATOR relies on.

On a private listener on loopback (a fresh port, closed afterwards), for
IPv4 and IPv6, as root (raw and packet sockets):

1. *cookie*: a SYN gets a SYN-cookie SYN-ACK (tcp_syncookies=2) whose ISN
   equals the cookie MITIGATOR computes from this agent's own ``get``
   answer (the text the server sends, parsed back) and the wall clock.
2. *cookie ACK*: an ACK carrying a cookie computed the same way, for a SYN
   the kernel never saw, opens a connection on a fresh listener.

Each check gives one result line; nothing here logs or prints a secret.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

from . import cookies
from .answers import HostFacts, get_text
from .snapshot import DeviceMissing, Snapshot, SnapshotError, read_snapshot

MSS = 1460
SYNACK_TIMEOUT = 3.0
ACCEPT_TIMEOUT = 3.0
SYNCOOKIES_REMEDY = "sysctl -w net.ipv4.tcp_syncookies=2"


@dataclass(frozen=True)
class Result:
    """One check: passed or not, and what to say."""

    ok: bool
    text: str


class CookieKeys:
    """The two cookie secrets as MITIGATOR learns them: parsed from a ``get`` answer."""

    def __init__(self, get_answer: str) -> None:
        fields: Dict[str, str] = {}
        for line in get_answer.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        self.by_version = {4: bytes.fromhex(fields["syncookie_secret"]),
                           6: bytes.fromhex(fields["syncookie6_secret"])}

    def cookie(self, version: int, src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress,
               sport: int, dport: int, client_isn: int, wall_ns: int) -> int:
        """The cookie ISN for a SYN from src:sport to dst:dport at wall time ``wall_ns``."""
        return cookies.cookie_isn(self.by_version[version], src, dst, sport, dport, client_isn, MSS,
                                  cookies.wall_cookie_count(wall_ns))


def ipv6_available() -> bool:
    """Whether ::1 can be bound (IPv6 may be disabled on the host)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def check_synack_cookie(keys: CookieKeys, version: int) -> Result:
    """The kernel's cookie SYN-ACK on a fresh loopback listener vs. the cookie from the answer."""
    from . import packets  # scapy: loaded only by the self-test
    from scapy.layers.inet import TCP

    src, dst = packets.client_address(version), packets.loopback(version)
    sport, isn = packets.random_port(), random.getrandbits(32)
    with packets.listener(version) as lsock, packets.capture() as cap:
        port = lsock.getsockname()[1]
        before = time.time_ns()
        packets.send(packets.segment(src, dst, sport, port, flags="S", seq=isn, options=[("MSS", MSS)]), dst)
        synack = packets.wait_for(cap, version, sport, timeout=SYNACK_TIMEOUT)
        after = time.time_ns()
    label = f"IPv{version} cookie SYN-ACK"
    if synack is None:
        return Result(False, f"{label}: the kernel did not answer a SYN on [{dst}]:{port}")
    if synack[TCP].flags != "SA":
        return Result(False, f"{label}: the kernel answered with flags {synack[TCP].flags}, not SYN-ACK")
    expected = {keys.cookie(version, src, dst, sport, port, isn, t) for t in (before, after)}
    if synack[TCP].seq not in expected:
        return Result(False, f"{label}: the kernel's cookie differs from the one computed from the agent's"
                             " answer (module not in wall-clock mode, or not the module the agent reads)")
    return Result(True, f"{label} = the cookie computed from the agent's answer")


def check_cookie_ack(keys: CookieKeys, version: int) -> Result:
    """A cookie ACK for a SYN the kernel never saw opens a connection on a fresh listener."""
    from . import packets

    src, dst = packets.client_address(version), packets.loopback(version)
    sport, isn = packets.random_port(), random.getrandbits(32)
    label = f"IPv{version} cookie ACK"
    with packets.listener(version) as fresh:
        port = fresh.getsockname()[1]
        cookie = keys.cookie(version, src, dst, sport, port, isn, time.time_ns())
        packets.send(packets.segment(src, dst, sport, port, flags="A", seq=(isn + 1) & 0xFFFFFFFF,
                                     ack=(cookie + 1) & 0xFFFFFFFF), dst)
        opened = packets.accepts(fresh, timeout=ACCEPT_TIMEOUT)
    if not opened:
        return Result(False, f"{label}: a valid cookie ACK did not open a connection on [{dst}]:{port}"
                             " (is the module loaded with accept_cookies=1?)")
    return Result(True, f"{label} for a SYN the kernel never saw opened a connection")


def run(device: str) -> List[Result]:
    """Every check, in order; stops early (with the reason) when a precondition is missing."""
    if os.geteuid() != 0:
        return [Result(False, "selftest needs root (it sends hand-made packets): run it with sudo or as root")]
    try:
        snap: Snapshot = read_snapshot(device)
    except DeviceMissing:
        return [Result(False, f"module: tcpsecrets is not loaded (no {device}): run modprobe tcpsecrets")]
    except OSError as exc:
        return [Result(False, f"module: cannot read {device} ({exc.strerror or exc})")]
    except SnapshotError as exc:
        return [Result(False, f"module: unusable snapshot from {device}: {exc}")]
    if snap.tcp_syncookies != 2:
        return [Result(False, f"tcp_syncookies is {snap.tcp_syncookies}, MITIGATOR needs 2: run {SYNCOOKIES_REMEDY}")]
    uname = os.uname()
    keys = CookieKeys(get_text(snap, HostFacts(uname.sysname, uname.release, "selftest", None)))
    versions: Tuple[int, ...] = (4, 6) if ipv6_available() else (4,)
    results: List[Result] = []
    for version in versions:
        results.append(check_synack_cookie(keys, version))
        results.append(check_cookie_ack(keys, version))
    if 6 not in versions:
        results.append(Result(True, "IPv6: disabled on this host (::1 cannot be bound); not tested"))
    return results

