"""MITIGATOR's side of the contract, emulated from exactly what it is told.

Two consumers, each built only from one answer text of the agent (or the
module's /proc text) plus the wall clock, so a test comparing their
predictions with the kernel's packets checks the whole contract:

- :class:`MitigatorV2308`: MITIGATOR v23.08+ (the isn_sync 26.04 contract).
  Knows the ``get`` answer's 11 lines.  Cookie counter = wall seconds // 60;
  TSval = SipHash(ts_secret; server, client) + wall ms + about 5 s.
- :class:`LegacyConsumer`: the tcpsecrets-era MITIGATOR (v20.12 to v23.02).
  Knows the legacy text and HZ from its own configuration.  Cookie counter
  = jiffies // (60 * HZ), jiffies carried forward from the text's
  (jiffies, time_ms) pair; TSval = uptime_ms carried forward +
  SipHash(timestamp_secret; server, client).  IPv4 only: the text has no
  IPv6 cookie secret.

The hashes and the cookie layout are the agent's own (mitigator_agent.cookies
primitives); what differs between consumers is only where each gets its
secrets and clocks.  Address arguments are ``ipaddress`` objects or strings.

Address order follows the kernel hash each method emulates:
``cookie(saddr, daddr, ...)`` takes the SYN's source (the client) first;
``ts_base``/``tsval_ok``/``ts_options`` take the side that picks the TS
offset first — the protected server (listener), then the client.

Importable as ``tests.emulators`` with the repository root on sys.path
(``python -m pytest`` from the root; the guest tests run that way).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, TypedDict, Union

from mitigator_agent import cookies

AddressLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
U32 = 0xFFFFFFFF

GET_KEYS = ("uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
            "tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling")
LEGACY_KEYS = ("time_sec", "time_ms", "uptime_ms", "jiffies", "cookie_secret", "net_secret", "timestamp_secret")
SECRET_BYTES = {"net_secret": 16, "syncookie_secret": 32, "syncookie6_secret": 32, "ts_secret": 16,
                "cookie_secret": 32, "timestamp_secret": 16}

# v23.08: a cookie SYN-ACK's TSval minus ts_base lies in [wall + 4800, wall + 5200) ms: the
# kernel's lead is 5000 ms minus the shift's rounding (< 64) and the option bits' (< 128).
TS_WINDOW_LOW_MS = 4800
TS_WINDOW_HIGH_MS = 5200
# Legacy: the text's clocks are whole ms, and the TS clock and the wall clock may drift
# apart by a few ms between the text and the SYN-ACK.
LEGACY_TS_SLACK_MS = 5
DEFAULT_HZ = 250  # Debian's CONFIG_HZ; the legacy consumer takes it from its configuration
NO_WSCALE = 0xF   # wscale bits when the SYN carried no window scale option

_LOWER_HEX = re.compile(r"[0-9a-f]+")
_DECIMAL = re.compile(r"-?[0-9]+")


class TsOptions(TypedDict):
    """The options a cookie SYN-ACK's TSval carries in its low six bits."""

    wscale: Optional[int]  # the client's window scale; None when it sent none (0xF)
    sack: bool
    ecn: bool


def _address(value: AddressLike) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    return ipaddress.ip_address(value) if isinstance(value, str) else value


def _parse_pairs(text: str, keys: Tuple[str, ...], separator: str, what: str) -> Dict[str, str]:
    """``key<separator>value`` lines, exactly ``keys`` in order, text ending in a newline.

    Values are non-empty and hold no blanks or control characters.
    """
    if not text.endswith("\n"):
        raise ValueError(f"{what}: does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) != len(keys):
        raise ValueError(f"{what}: {len(lines)} lines, expected {len(keys)}")
    values: Dict[str, str] = {}
    for number, (line, key) in enumerate(zip(lines, keys), start=1):
        name, sep, value = line.partition(separator)
        if not sep or name != key:
            raise ValueError(f"{what}: line {number} is not `{key}{separator}VALUE`")
        if not value or not value.isprintable() or any(char.isspace() for char in value):
            raise ValueError(f"{what}: line {number} ({key}) has an empty or malformed value")
        values[key] = value
    return values


def _secret(values: Dict[str, str], key: str, what: str) -> bytes:
    text = values[key]
    if len(text) != 2 * SECRET_BYTES[key] or not _LOWER_HEX.fullmatch(text):
        raise ValueError(f"{what}: {key} is not {2 * SECRET_BYTES[key]} lowercase hex digits")
    return bytes.fromhex(text)


def _number(values: Dict[str, str], key: str, what: str) -> int:
    if not _DECIMAL.fullmatch(values[key]):
        raise ValueError(f"{what}: {key} is not a decimal number")
    return int(values[key])


def decode_ts_options(bits: int) -> TsOptions:
    """Decode the low six bits of ``bits``: wscale bits 0-3, SACK bit 4, ECN bit 5."""
    wscale = bits & cookies.TS_WSCALE_MASK
    return TsOptions(wscale=None if wscale == NO_WSCALE else wscale, sack=bool(bits & cookies.TS_SACK),
                     ecn=bool(bits & cookies.TS_ECN))


@dataclass(frozen=True)
class MitigatorV2308:
    """MITIGATOR v23.08+, knowing one ``get`` answer (see the module docstring)."""

    uname: str
    version: str
    time: int
    net_secret: bytes = field(repr=False)
    syncookie_secret: bytes = field(repr=False)
    syncookie6_secret: bytes = field(repr=False)
    ts_secret: bytes = field(repr=False)
    tcp_ecn: int
    tcp_sack: int
    tcp_timestamps: int
    tcp_window_scaling: int

    @classmethod
    def from_get(cls, text: str) -> "MitigatorV2308":
        """Parse a ``get`` answer strictly: exactly the 11 ``key: value`` lines in isn_sync's order.

        Secrets must be lowercase hex of their exact length, ``time`` and the
        sysctls decimal numbers; anything else is a ValueError.
        """
        what = "get answer"
        values = _parse_pairs(text, GET_KEYS, ": ", what)
        return cls(
            uname=values["uname"],
            version=values["version"],
            time=_number(values, "time", what),
            net_secret=_secret(values, "net_secret", what),
            syncookie_secret=_secret(values, "syncookie_secret", what),
            syncookie6_secret=_secret(values, "syncookie6_secret", what),
            ts_secret=_secret(values, "ts_secret", what),
            tcp_ecn=_number(values, "tcp_ecn", what),
            tcp_sack=_number(values, "tcp_sack", what),
            tcp_timestamps=_number(values, "tcp_timestamps", what),
            tcp_window_scaling=_number(values, "tcp_window_scaling", what),
        )

    @staticmethod
    def count(wall_ns: int) -> int:
        """The cookie counter at wall time ``wall_ns``: CLOCK_REALTIME seconds // 60."""
        return cookies.wall_cookie_count(wall_ns)

    def _cookie_secret(self, version: int) -> bytes:
        return self.syncookie_secret if version == 4 else self.syncookie6_secret

    def cookie(self, saddr: AddressLike, daddr: AddressLike, sport: int, dport: int,
               client_isn: int, mss: int, wall_ns: int) -> int:
        """The cookie ISN MITIGATOR answers a SYN with at ``wall_ns``.

        saddr/sport: the SYN's source (client), daddr/dport: the protected
        server.  IPv4 uses syncookie_secret and the v4 MSS table, IPv6
        syncookie6_secret and the v6 table.
        """
        src, dst = _address(saddr), _address(daddr)
        return cookies.cookie_isn(self._cookie_secret(src.version), src, dst, sport, dport, client_isn, mss,
                                  self.count(wall_ns))

    def check_cookie(self, saddr: AddressLike, daddr: AddressLike, sport: int, dport: int,
                     client_isn: int, cookie: int, wall_ns: int) -> Optional[int]:
        """The MSS in an ACKed cookie (ack - 1) if valid at ``wall_ns`` (this or the last minute), else None."""
        src, dst = _address(saddr), _address(daddr)
        return cookies.cookie_mss(self._cookie_secret(src.version), src, dst, sport, dport, client_isn, cookie,
                                  self.count(wall_ns))

    def ts_base(self, saddr: AddressLike, daddr: AddressLike) -> int:
        """SipHash(ts_secret; saddr|daddr) & 0xffffffff: the part MITIGATOR subtracts from a TSval.

        saddr is the protected server (it picks the offset), daddr the
        client.  0 when the server's tcp_timestamps is not 1 (the kernel
        adds no per-connection offset then).
        """
        if self.tcp_timestamps != 1:
            return 0
        return cookies.ts_base(self.ts_secret, _address(saddr), _address(daddr))

    def tsval_ok(self, tsval: int, saddr: AddressLike, daddr: AddressLike, wall_ms_before: int) -> bool:
        """Whether (tsval - ts_base(saddr, daddr)) mod 2^32 lies in [wall_ms_before + 4800, + 5200).

        ``wall_ms_before``: wall clock (Unix ms) taken before the SYN went out.
        """
        clock = (tsval - self.ts_base(saddr, daddr)) & U32
        return (clock - wall_ms_before - TS_WINDOW_LOW_MS) & U32 < TS_WINDOW_HIGH_MS - TS_WINDOW_LOW_MS

    def ts_options(self, tsval: int, saddr: Optional[AddressLike] = None,
                   daddr: Optional[AddressLike] = None) -> TsOptions:
        """The options in a cookie SYN-ACK's TSval (wscale bits 0-3, SACK bit 4, ECN bit 5).

        With saddr (server) and daddr (client) given, ``tsval`` is the raw
        TSval and ts_base is subtracted first; without them ``tsval`` must
        already be TSval - ts_base: the raw TSval's low bits also hold
        ts_base's.
        """
        if saddr is not None and daddr is not None:
            tsval = (tsval - self.ts_base(saddr, daddr)) & U32
        elif (saddr is None) != (daddr is None):
            raise ValueError("give both addresses or neither")
        return decode_ts_options(tsval)


@dataclass(frozen=True)
class LegacyConsumer:
    """The tcpsecrets-era MITIGATOR, knowing one legacy text and HZ (see the module docstring)."""

    time_sec: int
    time_ms: int
    uptime_ms: int
    jiffies: int
    cookie_secret: bytes = field(repr=False)
    net_secret: bytes = field(repr=False)
    timestamp_secret: bytes = field(repr=False)
    hz: int = DEFAULT_HZ

    @classmethod
    def from_text(cls, text: str, hz: int = DEFAULT_HZ) -> "LegacyConsumer":
        """Parse the /proc/tcp_secrets text strictly: exactly its 7 ``name value`` lines in order."""
        what = "legacy text"
        values = _parse_pairs(text, LEGACY_KEYS, " ", what)
        return cls(
            time_sec=_number(values, "time_sec", what),
            time_ms=_number(values, "time_ms", what),
            uptime_ms=_number(values, "uptime_ms", what),
            jiffies=_number(values, "jiffies", what),
            cookie_secret=_secret(values, "cookie_secret", what),
            net_secret=_secret(values, "net_secret", what),
            timestamp_secret=_secret(values, "timestamp_secret", what),
            hz=hz,
        )

    def jiffies_at(self, wall_ns: int) -> int:
        """The text's jiffies carried to ``wall_ns`` along the wall clock since ``time_ms``.

        Within a jiffy of the kernel's (the text's clocks are truncated).
        """
        return self.jiffies + (wall_ns - self.time_ms * 10**6) * self.hz // 10**9

    def count(self, wall_ns: int) -> int:
        """The cookie counter this consumer assumes at ``wall_ns``: jiffies // (60 * HZ)."""
        return cookies.jiffies_cookie_count(self.jiffies_at(wall_ns), self.hz)

    def cookie(self, saddr: AddressLike, daddr: AddressLike, sport: int, dport: int,
               client_isn: int, mss: int, wall_ns: int) -> int:
        """The cookie ISN this consumer answers an IPv4 SYN with at ``wall_ns`` (client first).

        IPv6 is a ValueError: the legacy text carries no IPv6 cookie secret.
        """
        src, dst = _address(saddr), _address(daddr)
        if src.version != 4:
            raise ValueError("the legacy text carries the IPv4 cookie secret only")
        return cookies.cookie_isn(self.cookie_secret, src, dst, sport, dport, client_isn, mss,
                                  self.count(wall_ns))

    def ts_clock_at(self, wall_ns: int) -> int:
        """The text's uptime_ms carried to ``wall_ns`` (32 bits)."""
        return (self.uptime_ms + wall_ns // 10**6 - self.time_ms) & U32

    def ts_base(self, saddr: AddressLike, daddr: AddressLike) -> int:
        """SipHash(timestamp_secret; saddr|daddr) & 0xffffffff; saddr the server, daddr the client."""
        return cookies.ts_base(self.timestamp_secret, _address(saddr), _address(daddr))

    def tsval(self, saddr: AddressLike, daddr: AddressLike, wall_ns: int, wscale: Optional[int],
              sack: bool, ecn: bool) -> int:
        """The cookie SYN-ACK TSval this consumer expects at ``wall_ns`` (server first)."""
        return cookies.cookie_tsval(self.ts_clock_at(wall_ns), wscale, sack, ecn, self.ts_base(saddr, daddr))

    def tsval_ok(self, tsval: int, saddr: AddressLike, daddr: AddressLike,
                 wall_ns_before: int, wall_ns_after: int) -> bool:
        """Whether a cookie SYN-ACK TSval fits this consumer's clock between the two wall times.

        TSval - ts_base must lie between the clock at ``wall_ns_before``
        minus 127 ms (the option bits round it down) and the clock at
        ``wall_ns_after``, each widened by LEGACY_TS_SLACK_MS.
        """
        low = self.ts_clock_at(wall_ns_before) - 127 - LEGACY_TS_SLACK_MS
        high = self.ts_clock_at(wall_ns_after) + LEGACY_TS_SLACK_MS
        return ((tsval - self.ts_base(saddr, daddr)) - low) & U32 <= (high - low) & U32

