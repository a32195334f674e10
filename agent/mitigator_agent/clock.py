"""Clock health: the host's time service, the kernel's NTP state and a measured NTP offset.

MITIGATOR maps wall time to the server's cookie clock, so both sides must
run NTP.  ``ask_time_service`` asks the time service the host runs
(chrony via ``chronyc``, ntpd via ``ntpq``, systemd-timesyncd via
``timedatectl``) whether it keeps the clock synchronised and by how much
it is off; ``kernel_clock_state`` asks the kernel (``adjtimex`` with no
modes set: read-only, no privilege needed); ``measure_ntp_offset`` asks NTP
servers directly, for hosts whose time service cannot be asked (used by
``mitigator-agent check``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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
    """``host``, ``host:port``, ``[v6addr]:port`` or a bare IPv6 address; ValueError says what is wrong."""
    host, port_text = spec, ""
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{spec!r} is not HOST, HOST:PORT or [IPV6]:PORT")
        port_text = rest[1:]
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    if not host:
        raise ValueError(f"{spec!r} names no host")
    if not port_text:
        return host, DEFAULT_NTP_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{spec!r}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def describe_kernel_clock(clock: ClockState) -> str:
    """The kernel's clock state in plain words."""
    if clock.synchronized:
        return f"the kernel says an NTP daemon keeps it synchronised (maximum error {clock.maxerror_us // 1000} ms)"
    return "the kernel says no NTP daemon keeps it synchronised"


@dataclass(frozen=True)
class TimeService:
    """What the host's time service says about the clock."""

    name: str                     # chronyd, ntpd, systemd-timesyncd
    synchronized: bool
    offset: Optional[float]       # seconds the clock is ahead (+) or behind (-), when the service tells
    server: Optional[str]         # the server it follows, when it tells
    detail: str                   # the service's own words when not synchronised


Runner = Callable[[Sequence[str]], Optional[str]]


def run_quietly(args: Sequence[str], timeout: float = 3.0) -> Optional[str]:
    """stdout of a command that exited 0, else None (not installed, not running, timed out)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def parse_chronyc_tracking(text: str) -> Optional[TimeService]:
    """``chronyc -n tracking`` output -> TimeService (None if it is not that output)."""
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields[name.strip()] = value.strip()
    if "Leap status" not in fields:
        return None
    offset = None
    found = re.match(r"([0-9.]+) seconds (fast|slow)", fields.get("System time", ""))
    if found:
        offset = float(found.group(1)) * (1 if found.group(2) == "fast" else -1)
    server = None
    reference = re.search(r"\(([^)]+)\)", fields.get("Reference ID", ""))
    if reference:
        server = reference.group(1)
    leap = fields["Leap status"]
    synchronized = leap != "Not synchronised"
    return TimeService("chronyd", synchronized, offset, server, f"leap status {leap}")


def parse_ntpq_peers(text: str) -> Optional[TimeService]:
    """``ntpq -pn`` output -> TimeService: synchronised when a peer is selected (``*``)."""
    if "remote" not in text:
        return None
    for line in text.splitlines():
        if line.startswith("*"):
            fields = line[1:].split()
            try:
                return TimeService("ntpd", True, float(fields[8]) / 1000, fields[0], "")
            except (IndexError, ValueError):
                return TimeService("ntpd", True, None, fields[0] if fields else None, "")
    return TimeService("ntpd", False, None, None, "no peer selected (no line starts with *)")


def parse_timedatectl(text: str, server_text: Optional[str]) -> Optional[TimeService]:
    """``timedatectl show`` (and ``show-timesync -p ServerName --value``) -> TimeService."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "NTPSynchronized" not in fields:
        return None
    if fields.get("NTP") != "yes":
        return TimeService("systemd-timesyncd", False, None, None, "NTP is switched off (timedatectl set-ntp)")
    synchronized = fields["NTPSynchronized"] == "yes"
    server = (server_text or "").strip() or None
    return TimeService("systemd-timesyncd", synchronized, None, server,
                       "" if synchronized else "not synchronised yet")


def ask_time_service(runner: Runner = run_quietly) -> Optional[TimeService]:
    """Ask the time service that runs here: chronyd, then ntpd, then systemd-timesyncd; None if none answers."""
    text = runner(["chronyc", "-n", "tracking"])
    if text is not None and (found := parse_chronyc_tracking(text)) is not None:
        return found
    text = runner(["ntpq", "-pn"])
    if text is not None and (found := parse_ntpq_peers(text)) is not None:
        return found
    if runner(["systemctl", "is-active", "--quiet", "systemd-timesyncd"]) is not None:
        text = runner(["timedatectl", "show"])
        if text is not None:
            return parse_timedatectl(text, runner(["timedatectl", "show-timesync", "-p", "ServerName", "--value"]))
    return None


@dataclass(frozen=True)
class NtpMeasurement:
    """Offset of the local clock against one NTP server (seconds; + = we are behind)."""

    server: str
    offset: float


class NtpUnavailable(Exception):
    """No configured NTP server answered; the message lists each failure."""


def measure_ntp_offset(servers: Sequence[str], timeout: float = 2.0) -> NtpMeasurement:
    """Ask each server in turn; return the first answer.

    Each failure is said in words (``no answer within 3 s``, ``cannot
    resolve HOST: ...``), never as an errno or an exception's text.
    """
    client = ntplib.NTPClient()
    failures: List[str] = []
    for spec in servers:
        try:
            host, port = parse_ntp_server(spec)
            response = client.request(host, version=3, port=port, timeout=timeout)
        except ValueError as exc:
            failures.append(str(exc))
        except socket.gaierror as exc:
            failures.append(f"{spec}: cannot resolve {host} ({exc.strerror or 'unknown name'})")
        except ntplib.NTPException as exc:
            failures.append(f"{spec}: no answer within {timeout:g} s" if "No response" in str(exc)
                            else f"{spec}: the answer is not NTP")
        except OSError as exc:
            failures.append(f"{spec}: {(exc.strerror or str(exc)).lower()}")
        else:
            return NtpMeasurement(spec, response.offset)
    raise NtpUnavailable("; ".join(failures) or "no NTP server configured")
