"""Hand-made TCP segments in a test guest, and network namespaces to send them to.

The segment code is the agent's own (mitigator_agent.packets, which
``selftest`` uses), re-exported here; this module adds network namespaces.
A "container" is a network namespace behind a veth pair.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

from mitigator_agent.packets import (Address, accepts, capture, client_address, listener, loopback,
                                     random_port, segment, send, wait_for)

__all__ = ["Address", "accepts", "capture", "client_address", "listener", "loopback", "random_port",
           "segment", "send", "wait_for", "inside", "netns", "container", "set_sysctl_in"]

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
