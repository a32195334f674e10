"""Hand-made TCP segments in a test guest, and network namespaces to send them to.

Packets are crafted with scapy, sent through a raw socket and captured with
a packet socket (on `lo`, or the host end of a veth pair), so the kernel
under test sees exactly what a remote client (or MITIGATOR answering for us)
would send. A "container" is a network namespace behind a veth pair.
"""

from __future__ import annotations

import ipaddress
import ctypes
import os
import random
import select
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator, Union

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

ETH_P_ALL = 0x0003
PACKET_HOST = 0
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def loopback(version: int) -> Address:
    return ipaddress.ip_address("127.0.0.1" if version == 4 else "::1")


def client_address(version: int) -> Address:
    """A source that is not the listener's own address (v6 has only ::1 on lo)."""
    return ipaddress.ip_address("127.0.0.2" if version == 4 else "::1")


def random_port() -> int:
    return random.randint(20000, 60000)


def segment(src: Address, dst: Address, sport: int, dport: int, **tcp) -> bytes:
    layer3 = IP(src=str(src), dst=str(dst)) if src.version == 4 else IPv6(src=str(src), dst=str(dst))
    return bytes(layer3 / TCP(sport=sport, dport=dport, **tcp))


def send(packet: bytes, dst: Address) -> None:
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(packet, (str(dst), 0))


@contextmanager
def capture(interface: str = "lo") -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    try:
        yield sock
    finally:
        sock.close()


def wait_for(sock: socket.socket, version: int, dport: int, timeout: float = 5.0):
    """The first TCP segment to `dport` seen on lo, as a scapy packet, or None."""
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


def listener(version: int, port: int = 0, address: Address | None = None) -> socket.socket:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(address or loopback(version)), port))
    sock.listen(16)
    return sock


def accepts(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether a connection becomes ready for accept() within `timeout`."""
    sock.settimeout(timeout)
    try:
        conn, _ = sock.accept()
    except socket.timeout:
        return False
    conn.close()
    return True


LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the calling thread in the network namespace `name` (sockets made here stay there)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        assert LIBC.setns(target, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        yield
    finally:
        assert LIBC.setns(home, CLONE_NEWNET) == 0
        os.close(target)
        os.close(home)


@contextmanager
def netns(name: str) -> Iterator[str]:
    """A fresh network namespace `name` with lo up, deleted afterwards; yields its name.

    Only its sockets live there (see inside()): the secrets cannot be read
    from a namespace other than the host's.
    """
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


# A container: its namespace reached from the host through a veth pair.
HOST_SIDE = {4: ipaddress.ip_address("10.200.0.1"), 6: ipaddress.ip_address("fd00:200::1")}
CONTAINER_SIDE = {4: ipaddress.ip_address("10.200.0.2"), 6: ipaddress.ip_address("fd00:200::2")}
HOST_VETH = "tsveth0"


@contextmanager
def container(name: str) -> Iterator[str]:
    """A network namespace behind a veth pair (addresses above); yields its name."""
    ip = ["ip"]
    subprocess.run(ip + ["netns", "add", name], check=True)
    try:
        for command in (
            ["link", "add", HOST_VETH, "type", "veth", "peer", "name", "eth0", "netns", name],
            ["addr", "add", f"{HOST_SIDE[4]}/24", "dev", HOST_VETH],
            ["addr", "add", f"{HOST_SIDE[6]}/64", "dev", HOST_VETH, "nodad"],
            ["link", "set", HOST_VETH, "up"],
            ["-n", name, "addr", "add", f"{CONTAINER_SIDE[4]}/24", "dev", "eth0"],
            ["-n", name, "addr", "add", f"{CONTAINER_SIDE[6]}/64", "dev", "eth0", "nodad"],
            ["-n", name, "link", "set", "eth0", "up"],
            ["-n", name, "link", "set", "lo", "up"],
        ):
            subprocess.run(ip + command, check=True)
        yield name
    finally:
        subprocess.run(ip + ["netns", "del", name], check=True)  # takes the veth pair with it


def set_sysctl_in(name: str, sysctl: str, value: int) -> None:
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv4.{sysctl}={value}"], check=True)
