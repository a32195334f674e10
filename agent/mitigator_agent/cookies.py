"""The Linux TCP algorithms a MITIGATOR-side consumer reproduces.

Computed from a Snapshot alone: SYN cookies (IPv4 and IPv6, make and check),
the secure ISN and the TCP timestamp offset, and the timestamp a cookie
SYN-ACK carries.  Addresses are ``ipaddress`` objects, ports host-order ints.
The snapshot-free primitives (:func:`cookie_isn`, :func:`cookie_mss`,
:func:`ts_base`) serve consumers that know only the secrets, such as
MITIGATOR with a ``get`` answer.

Which clocks and offsets apply depends on the module (snapshot flags):

- Cookie counter: wall mode (F_WALL_CLOCK, the module's default)
  ``count = CLOCK_REALTIME seconds // 60`` (:func:`wall_cookie_count`), for
  IPv4 and IPv6; jiffies mode (the stock kernel)
  ``count = jiffies64 // (60 * HZ)`` (:func:`jiffies_cookie_count`).  The
  snapshot's ``cookie_count`` is the kernel's value at its ``realtime_ns``.
- TS offset with F_TS_OFFSET_HOOK (every ABI-2 module), on every kernel:
  ``(SipHash(ts_secret; saddr|daddr) & 0xffffffff if tcp_timestamps == 1
  else 0) + ts_shift_ms`` mod 2^32, saddr being the side that picks the
  offset (for a listener: its own address).  ``ts_shift_ms`` is
  ``((wall_ms - tcp_clock_ms + 5000) & ~63)`` in wall mode
  (:func:`wall_ts_shift_ms`) and 0 in jiffies mode.  Without the hook the
  kernel's own scheme applies: a separate ``ts_secret`` (older kernels) or
  the high half of one 64-bit SipHash keyed by ``net_secret`` (6.1.192+,
  6.12+).
- The ISN is the kernel's in every mode: the low 32 bits of
  SipHash(net_secret; addresses, ports) + (realtime_ns >> 6).

Byte order matters throughout: the kernel hashes addresses and ports as they
sit in the packet (network order) but loads them into little-endian u32
words, so the SipHash input is built from raw wire bytes exactly as the
kernel lays them out in memory.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Union

from siphash24 import siphash24

from .snapshot import ALG_SEQ_AND_TS_OFF, NS_PER_COOKIE_MINUTE, Snapshot

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

COOKIE_BITS = 24
COOKIE_MASK = (1 << COOKIE_BITS) - 1
MAX_COOKIE_AGE = 2  # the kernel accepts the current minute and the previous one
MSS_TABLE_V4 = (536, 1300, 1440, 1460)
MSS_TABLE_V6 = (1280 - 60, 1480 - 60, 1500 - 60, 9000 - 60)
TS_OPTION_BITS = 6  # low TSval bits of a cookie SYN-ACK encode wscale/SACK/ECN
TS_WSCALE_MASK = 0xF
TS_SACK = 1 << 4
TS_ECN = 1 << 5
TS_WALL_LEAD_MS = 5000  # wall mode: TSvals run this far ahead of the wall clock
U32 = 0xFFFFFFFF


def wall_cookie_count(wall_ns: int) -> int:
    """The wall-mode cookie counter at ``wall_ns`` (CLOCK_REALTIME ns): minutes, 32 bits."""
    return (wall_ns // NS_PER_COOKIE_MINUTE) & U32


def jiffies_cookie_count(jiffies64: int, hz: int) -> int:
    """The stock kernel's cookie counter: jiffies64 // (60 * hz), 32 bits."""
    return (jiffies64 // (60 * hz)) & U32


def wall_ts_shift_ms(wall_ms: int, tcp_clock_ms: int) -> int:
    """The wall-mode TS shift: ((wall_ms - tcp_clock_ms + 5000) & ~63) mod 2^32.

    A multiple of 64, so the low six TSval bits of a cookie SYN-ACK keep
    carrying its options.  The module computes it at every use (each
    SYN-ACK, each snapshot), so it follows a stepped wall clock; two reads
    may differ by one step of 64 where wall_ms - tcp_clock_ms sits on a
    multiple of 64 (the two clocks are floored to ms separately).
    """
    return ((wall_ms - tcp_clock_ms + TS_WALL_LEAD_MS) & ~((1 << TS_OPTION_BITS) - 1)) & U32


def cookie_count_at(snap: Snapshot, wall_ns: int) -> int:
    """The counter the kernel of ``snap`` uses at wall time ``wall_ns``.

    Wall mode: straight from ``wall_ns``.  Jiffies mode: the snapshot's
    jiffies carried forward (or back) by the wall time elapsed since it.
    """
    if snap.wall_clock:
        return wall_cookie_count(wall_ns)
    jiffies = snap.jiffies64 + (wall_ns - snap.realtime_ns) * snap.hz // 10**9
    return jiffies_cookie_count(jiffies, snap.hz)


def siphash(key: bytes, message: bytes) -> int:
    """SipHash-2-4 as the kernel's siphash(): 16-byte key, u64 result."""
    return int.from_bytes(siphash24(message, key=key).digest(), "little")


def _port_word(sport: int, dport: int) -> bytes:
    """The kernel's `(u32)sport << 16 | dport` of two __be16, as memory bytes."""
    sw = int.from_bytes(sport.to_bytes(2, "big"), "little")
    dw = int.from_bytes(dport.to_bytes(2, "big"), "little")
    return struct.pack("<I", (sw << 16 | dw) & U32)


def _mss_index(mss: int, table: tuple[int, ...]) -> int:
    """Index of the largest table entry <= mss (0 when mss is below them all)."""
    for index in range(len(table) - 1, 0, -1):
        if mss >= table[index]:
            return index
    return 0


def _cookie_hash(
    secret: bytes, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    count: int, which: int,
) -> int:
    key = secret[16 * which:16 * which + 16]
    if saddr.version == 4:
        message = saddr.packed + daddr.packed + _port_word(sport, dport) + struct.pack("<I", count & U32)
        return siphash(key, message) & U32
    message = (saddr.packed + daddr.packed + struct.pack("<I", count & U32)
               + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    return siphash(key, message) & U32


def cookie_isn(
    secret: bytes, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    client_isn: int, mss: int, count: int,
) -> int:
    """The kernel's cookie ISN from one 32-byte syncookie secret (v4 or v6 by address).

    ``secret`` is syncookie_secret for IPv4, syncookie6_secret for IPv6;
    saddr/sport are the client's, daddr/dport the listener's.
    """
    mssind = _mss_index(mss, mss_table(saddr.version))
    h0 = _cookie_hash(secret, saddr, daddr, sport, dport, 0, 0)
    h1 = _cookie_hash(secret, saddr, daddr, sport, dport, count, 1)
    return (h0 + client_isn + ((count << COOKIE_BITS) & U32) + ((h1 + mssind) & COOKIE_MASK)) & U32


def cookie_mss(
    secret: bytes, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    client_isn: int, cookie: int, count: int,
) -> int | None:
    """The MSS in ``cookie`` if the kernel would accept it at ``count``, else None.

    Accepted: made at ``count`` or one minute before, with a valid MSS index.
    """
    rest = (cookie - _cookie_hash(secret, saddr, daddr, sport, dport, 0, 0) - client_isn) & U32
    age = (count - (rest >> COOKIE_BITS)) & (U32 >> COOKIE_BITS)
    if age >= MAX_COOKIE_AGE:
        return None
    mssind = (rest - _cookie_hash(secret, saddr, daddr, sport, dport, count - age, 1)) & COOKIE_MASK
    table = mss_table(saddr.version)
    return table[mssind] if mssind < len(table) else None


def _cookie_secret(snap: Snapshot, version: int) -> bytes:
    return snap.syncookie_secret if version == 4 else snap.syncookie6_secret


def mss_table(version: int) -> tuple[int, ...]:
    """The kernel's cookie MSS table for IP version 4 or 6."""
    return MSS_TABLE_V4 if version == 4 else MSS_TABLE_V6


def encoded_mss(version: int, mss: int) -> int:
    """The MSS a cookie carries for a client MSS: the largest table entry <= it."""
    table = mss_table(version)
    return table[_mss_index(mss, table)]


def make_cookie(
    snap: Snapshot, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    client_isn: int, mss: int, count: int | None = None,
) -> int:
    """The ISN a listener puts in its cookie SYN-ACK for this SYN.

    saddr/sport are the client's (the SYN's source), daddr/dport the
    listener's.  ``count`` defaults to the snapshot's cookie counter (the
    kernel's, wall or jiffies); :func:`cookie_count_at` gives it for
    another moment.
    """
    if count is None:
        count = snap.cookie_count
    return cookie_isn(_cookie_secret(snap, saddr.version), saddr, daddr, sport, dport, client_isn, mss, count)


def check_cookie(
    snap: Snapshot, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    client_isn: int, cookie: int, count: int | None = None,
) -> int | None:
    """The MSS encoded in a cookie the kernel would accept now, else None.

    ``cookie`` is the acknowledged number minus one, ``client_isn`` the
    client's ISN (the ACK's sequence number minus one).
    """
    if count is None:
        count = snap.cookie_count
    return cookie_mss(_cookie_secret(snap, saddr.version), saddr, daddr, sport, dport, client_isn, cookie, count)


def ts_base(ts_secret: bytes, saddr: IPAddress, daddr: IPAddress) -> int:
    """SipHash(ts_secret; saddr|daddr) & 0xffffffff: the per-connection TS part.

    saddr is the side choosing the offset (for a listener: its own
    address), daddr the peer; 4+4 address bytes for IPv4, 16+16 for IPv6.
    """
    return siphash(ts_secret, saddr.packed + daddr.packed) & U32


def _isn_hash_message(saddr: IPAddress, daddr: IPAddress, sport: int, dport: int) -> bytes:
    if saddr.version == 4:
        return saddr.packed + daddr.packed + _port_word(sport, dport)
    return saddr.packed + daddr.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


def isn_and_ts_offset(
    snap: Snapshot, saddr: IPAddress, daddr: IPAddress, sport: int, dport: int,
    realtime_ns: int | None = None,
) -> tuple[int, int]:
    """The kernel's secure ISN and TCP timestamp offset for a connection.

    saddr/sport are the ISN-choosing side's local address and port (for a
    passive open: the listener's), daddr/dport the peer's, as in
    secure_tcp_seq(). ``realtime_ns`` defaults to the snapshot's clock; the
    ISN's clock part is realtime_ns >> 6.

    The offset: with F_TS_OFFSET_HOOK, ts_base(ts_secret) (0 unless
    tcp_timestamps == 1) plus ts_shift_ms, mod 2^32; without it the
    kernel's own scheme (0 unless tcp_timestamps == 1).
    """
    if realtime_ns is None:
        realtime_ns = snap.realtime_ns
    message = _isn_hash_message(saddr, daddr, sport, dport)
    hashed = siphash(snap.net_secret, message)
    seq = hashed & U32
    if snap.ts_offset_hook:
        hashed_part = ts_base(snap.ts_secret, saddr, daddr) if snap.tcp_timestamps == 1 else 0
        ts_off = (hashed_part + snap.ts_shift_ms) & U32
    elif snap.tcp_timestamps != 1:
        ts_off = 0
    elif snap.algorithm == ALG_SEQ_AND_TS_OFF:
        ts_off = hashed >> 32
    else:
        ts_off = ts_base(snap.ts_secret, saddr, daddr)
    return (seq + (realtime_ns >> 6)) & U32, ts_off


def cookie_tsval(tcp_clock_ms: int, wscale: int | None, sack: bool, ecn: bool, ts_off: int = 0) -> int:
    """The TSval of a cookie SYN-ACK sent at ``tcp_clock_ms``.

    The low six bits carry the client's window scale (0xF when none), SACK
    and ECN, the rest is the clock rounded down; ``ts_off`` (which includes
    ts_shift_ms in wall mode) is then added.
    """
    options = TS_WSCALE_MASK if wscale is None else wscale & TS_WSCALE_MASK
    if sack:
        options |= TS_SACK
    if ecn:
        options |= TS_ECN
    ts = ((tcp_clock_ms >> TS_OPTION_BITS) << TS_OPTION_BITS) | options
    if ts > tcp_clock_ms:
        ts -= 1 << TS_OPTION_BITS
    return (ts + ts_off) & U32
