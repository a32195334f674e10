"""Hand-made TCP segments on this host's loopback, for ``selftest`` and the kernel tests.

Segments are crafted with scapy, sent through a raw IP socket and captured
with a packet socket on ``lo``, so the kernel sees exactly what a remote
client (or MITIGATOR answering for us) would send. Needs CAP_NET_RAW.
scapy is imported here only: the agent's server never loads it.
"""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

ETH_P_ALL = 0x0003
PACKET_HOST = 0  # sll_pkttype of a packet delivered to this host
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def loopback(version: int) -> Address:
    """The listener's address: 127.0.0.1 or ::1."""
    return ipaddress.ip_address("127.0.0.1" if version == 4 else "::1")


def client_address(version: int) -> Address:
    """A client source on lo that is not the listener's own address (v6 has only ::1 on lo)."""
    return ipaddress.ip_address("127.0.0.2" if version == 4 else "::1")


def random_port() -> int:
    """A client port unlikely to collide with a real connection."""
    return random.randint(20000, 60000)


def segment(src: Address, dst: Address, sport: int, dport: int, **tcp: Any) -> bytes:
    """The bytes of one IPv4/IPv6 TCP segment; ``tcp`` are scapy TCP fields (flags, seq, ack, options…)."""
    layer3 = IP(src=str(src), dst=str(dst)) if src.version == 4 else IPv6(src=str(src), dst=str(dst))
    return bytes(layer3 / TCP(sport=sport, dport=dport, **tcp))


def send(packet: bytes, dst: Address) -> None:
    """Send a complete IP packet through a raw socket (the kernel adds nothing)."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(packet, (str(dst), 0))


@contextmanager
def capture(interface: str = "lo") -> Iterator[socket.socket]:
    """A packet socket seeing every packet on ``interface`` while the block runs."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    try:
        yield sock
    finally:
        sock.close()


def wait_for(sock: socket.socket, version: int, dport: int, timeout: float = 5.0) -> Optional[Any]:
    """The first TCP segment to ``dport`` seen on the capture, as a scapy packet, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, addr = sock.recvfrom(65535)
        if addr[2] != PACKET_HOST:
            continue  # lo shows each packet twice: keep the delivered copy
        pkt = IP(data) if version == 4 and data[0] >> 4 == 4 else (
            IPv6(data) if version == 6 and data[0] >> 4 == 6 else None)
        if pkt is not None and TCP in pkt and pkt[TCP].dport == dport:
            return pkt
    return None


def listener(version: int, port: int = 0, address: Optional[Address] = None) -> socket.socket:
    """A listening TCP socket on ``address`` (default: loopback), ``port`` 0 picks a free one."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(address or loopback(version)), port))
    sock.listen(16)
    return sock


def accepts(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether a connection becomes ready for accept() within ``timeout``."""
    sock.settimeout(timeout)
    try:
        conn, _ = sock.accept()
    except socket.timeout:
        return False
    conn.close()
    return True
