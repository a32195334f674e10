"""A handshake whose SYN-ACK and ACK straddle a load or an unload of the module (kmod/handover.c).

An update of the module is an rmmod and an insmod. With tcp_syncookies=2
every SYN-ACK is a cookie, and the module changes both the cookie's
counter and the timestamp offset that carries the client's options. Before
handover.c, a swap every 0.8 s under load (TCG, 2 ms loopback delay) reset
about 23 handshakes per swap and stalled one: the ACK was judged by the
other side of the switch.

Here one SYN (MSS, SACK, timestamps, window scale 7) gets its SYN-ACK on
one side of the switch and its ACK is sent on the other: the connection
must be accepted with the options the SYN asked for. (Continuous traffic
while the module's hooks are patched in makes TCG guests lock up at the
patched instruction, with or without this module's change: so no flood.)
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import time
from typing import Callable

import pytest
from scapy.layers.inet import TCP

from . import packets
from .conftest import load, module_loaded, unload

WSCALE = 7
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4


def handshake_across(version: int, switch: Callable[[], None]) -> socket.socket:
    """SYN to a fresh listener, its SYN-ACK, `switch()`, the ACK: the accepted connection.

    Fails if the listener refuses the ACK (no connection within 3 s).
    """
    with packets.listener(version) as lsock:
        port = lsock.getsockname()[1]
        src, dst = packets.client_address(version), packets.loopback(version)
        sport, isn, tsval = packets.random_port(), random.getrandbits(32), random.getrandbits(31) + 1
        syn = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, 0)), ("WScale", WSCALE)]
        with packets.capture() as cap:
            packets.send(packets.segment(src, dst, sport, port, flags="S", seq=isn, options=syn), dst)
            synack = packets.wait_for(cap, version, sport)
        assert synack is not None and synack[TCP].flags == "SA", "no SYN-ACK from the listener"
        echoed = dict(synack[TCP].options)["Timestamp"][0]
        switch()
        packets.send(packets.segment(src, dst, sport, port, flags="A", seq=(isn + 1) & 0xFFFFFFFF,
                                     ack=(synack[TCP].seq + 1) & 0xFFFFFFFF,
                                     options=[("Timestamp", (tsval + 1, echoed))]), dst)
        lsock.settimeout(3)
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            pytest.fail("the ACK of a SYN-ACK sent before the switch was refused")
        return conn


def assert_options_kept(conn: socket.socket) -> None:
    """The server side took the SYN's options back from the cookie's timestamp."""
    with conn:
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    options, wscales = struct.unpack_from("5xBB", info)
    wanted = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    assert options & wanted == wanted and wscales & 0x0F == WSCALE, (
        f"options decoded wrong: tcpi_options {options:#x}, send window scale {wscales & 0x0F}"
        f" (the SYN asked for timestamps, SACK and scale {WSCALE})")


@pytest.mark.parametrize("version", [4, 6])
def test_handshake_across_a_load(syncookies: Callable[[int], None], version: int) -> None:
    syncookies(2)
    unload()
    try:
        assert_options_kept(handshake_across(version, load))
    finally:
        unload()


@pytest.mark.parametrize("version", [4, 6])
def test_handshake_across_an_unload(syncookies: Callable[[int], None], version: int) -> None:
    syncookies(2)
    unload()
    load()
    rmmod: list[subprocess.Popen] = []

    def start_unloading() -> None:
        rmmod.append(subprocess.Popen(["rmmod", "tcpsecrets"]))
        time.sleep(0.4)
        # The module has just made a cookie: it keeps taking its own for a second before it goes.
        assert rmmod[0].poll() is None, "rmmod returned at once: nothing left to judge the ACK by"

    try:
        conn = handshake_across(version, start_unloading)
        assert_options_kept(conn)
        assert rmmod[0].wait(timeout=30) == 0
        assert not module_loaded()
    finally:
        if rmmod and rmmod[0].poll() is None:
            rmmod[0].wait(timeout=30)
        unload()
