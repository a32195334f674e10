"""Kernel NTP state via adjtimex and the ntplib offset, against a local NTP responder."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import ntplib
import pytest

from mitigator_agent import clock
from mitigator_agent.clock import (
    STA_UNSYNC,
    TIME_ERROR,
    NtpUnavailable,
    kernel_clock_state,
    kernel_clock_synced,
    measure_ntp_offset,
    parse_ntp_server,
)


class FakeNtpServer:
    """Answers NTP client requests on 127.0.0.1 with the local clock plus ``skew`` seconds."""

    def __init__(self, skew: float) -> None:
        self.skew = skew
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(512)
            if not data:
                return  # close() asks the thread to stop
            request = ntplib.NTPPacket()
            request.from_data(data)
            now = ntplib.system_to_ntp_time(time.time() + self.skew)
            reply = ntplib.NTPPacket(version=3, mode=4, tx_timestamp=now)
            reply.stratum = 2
            reply.recv_timestamp = now
            reply.ref_timestamp = now
            reply.orig_timestamp = request.tx_timestamp
            self.sock.sendto(reply.to_data(), peer)

    def close(self) -> None:
        # close() alone would not wake a thread blocked in recvfrom().
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", self.sock.getsockname())
        self._thread.join()
        self.sock.close()


@pytest.fixture
def ntp_server() -> Iterator[FakeNtpServer]:
    server = FakeNtpServer(skew=100.0)
    yield server
    server.close()


def closed_udp_port() -> str:
    """An address where nothing answers (the port was just released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_kernel_clock_state_is_consistent():
    state = kernel_clock_state()
    assert 0 <= state.state <= TIME_ERROR
    assert state.synchronized == (state.state != TIME_ERROR and not state.status & STA_UNSYNC)
    assert kernel_clock_synced() is state.synchronized


def test_kernel_clock_synced_unknown_when_adjtimex_fails(monkeypatch):
    def failing() -> clock.ClockState:
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(clock, "kernel_clock_state", failing)
    assert kernel_clock_synced() is None


def test_the_c_library_is_looked_up_once_not_per_answer(monkeypatch):
    # Every `get` asks the clock state.  ctypes.util.find_library runs
    # `ldconfig -p` in a child process (~1.4 ms): per answer, that was most
    # of the agent's own CPU and left memory behind (issue 9's growth per poll).
    import ctypes.util
    lookups = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: lookups.append(name) or real(name))
    clock.libc.cache_clear()
    try:
        for _ in range(5):
            kernel_clock_synced()
    finally:
        clock.libc.cache_clear()
    assert lookups == ["c"]


@pytest.mark.parametrize("spec, parsed", [
    ("pool.ntp.org", ("pool.ntp.org", 123)),
    ("192.0.2.1:1123", ("192.0.2.1", 1123)),
    ("[2001:db8::1]:1123", ("2001:db8::1", 1123)),
    ("[2001:db8::1]", ("2001:db8::1", 123)),
    ("2001:db8::1", ("2001:db8::1", 123)),
])
def test_parse_ntp_server(spec, parsed):
    assert parse_ntp_server(spec) == parsed


def test_offset_measured_against_the_first_server_that_answers(ntp_server):
    measured = measure_ntp_offset([closed_udp_port(), ntp_server.address], timeout=0.5)
    assert measured.server == ntp_server.address
    assert 99.0 < measured.offset < 101.0


def test_no_server_answering_names_each_failure():
    silent = closed_udp_port()
    with pytest.raises(NtpUnavailable, match=f"{silent}: "):
        measure_ntp_offset([silent], timeout=0.2)
    with pytest.raises(NtpUnavailable, match="no NTP server configured"):
        measure_ntp_offset([], timeout=0.2)
