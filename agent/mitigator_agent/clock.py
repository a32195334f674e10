"""Clock health: the kernel's NTP state and a measured NTP offset.

MITIGATOR maps wall time to the server's cookie clock, so both sides must
run NTP.  ``kernel_clock_state`` asks the kernel (``adjtimex`` with no
modes set: read-only, no privilege needed) whether an NTP daemon keeps the
clock synchronised; ``measure_ntp_offset`` asks NTP servers directly
(used by ``mitigator-agent check``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import ntplib

TIME_ERROR = 5       # adjtimex() return value: clock not synchronised
STA_UNSYNC = 0x0040  # timex.status bit: clock not synchronised
DEFAULT_NTP_SERVERS = ("pool.ntp.org",)
DEFAULT_NTP_PORT = 123


class _Timex(ctypes.Structure):
    """Linux ``struct timex`` (LP64 layout: x86_64, arm64)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class ClockState:
    """The kernel's view of its clock discipline."""

    synchronized: bool
    state: int          # adjtimex() return value (TIME_OK=0 ... TIME_ERROR=5)
    status: int         # timex.status bits
    maxerror_us: int    # maximum error estimate, microseconds


@functools.lru_cache(maxsize=None)
def libc() -> ctypes.CDLL:
    """The C library, loaded once per process.

    Cached because ``ctypes.util.find_library`` runs ``ldconfig -p`` in a
    child process (about 1.4 ms), and every ``get`` asks the clock state:
    uncached, that was most of the agent's own CPU per answer, and each new
    CDLL left a little memory behind.
    """
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def kernel_clock_state() -> ClockState:
    """Read the NTP state with adjtimex(); raise OSError if the call fails.

    Synchronised means: the call did not return TIME_ERROR and STA_UNSYNC
    is clear (an NTP daemon is disciplining the clock).
    """
    timex = _Timex()  # modes = 0: read only
    result = libc().adjtimex(ctypes.byref(timex))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    synchronized = result != TIME_ERROR and not timex.status & STA_UNSYNC
    return ClockState(synchronized, result, timex.status, timex.maxerror)


def kernel_clock_synced() -> Optional[bool]:
    """True/False from adjtimex, None when the kernel cannot be asked."""
    try:
        return kernel_clock_state().synchronized
    except (OSError, AttributeError):
        return None


def parse_ntp_server(spec: str) -> Tuple[str, int]:
    """``host``, ``host:port``, ``[v6addr]:port`` or a bare IPv6 address."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else DEFAULT_NTP_PORT
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, DEFAULT_NTP_PORT


@dataclass(frozen=True)
class NtpMeasurement:
    """Offset of the local clock against one NTP server (seconds; + = we are behind)."""

    server: str
    offset: float


class NtpUnavailable(Exception):
    """No configured NTP server answered; the message lists each failure."""


def measure_ntp_offset(servers: Sequence[str], timeout: float = 2.0) -> NtpMeasurement:
    """Ask each server in turn; return the first answer."""
    client = ntplib.NTPClient()
    failures: List[str] = []
    for spec in servers:
        try:
            host, port = parse_ntp_server(spec)
            response = client.request(host, version=3, port=port, timeout=timeout)
        except (ntplib.NTPException, OSError, ValueError) as exc:
            failures.append(f"{spec}: {exc}")
            continue
        return NtpMeasurement(spec, response.offset)
    raise NtpUnavailable("; ".join(failures) or "no NTP server configured")
