"""mitigator_agent.cookies against fixed vectors.

The vectors in vectors/ were recorded from a real Debian 6.1.0-56-amd64
kernel with the first tcpsecrets module (ABI 1: jiffies clock, no TS hook) (tests/kernel/ re-proves them live on every
run): a /dev/tcpsecrets snapshot, a SYN we sent, and the SYN-ACK the kernel
answered, once with tcp_syncookies=2 (a cookie) and once with 1 (a plain
ISN and timestamp).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from mitigator_agent import cookies
from mitigator_agent.snapshot import CLOCK_WALL, DERIVED, F_TS_OFFSET_HOOK, F_TS_SECRET, F_WALL_CLOCK, decode

VECTORS = json.loads((Path(__file__).parent / "vectors" / "debian-6.1.0-56-amd64.json").read_text())
U32 = 0xFFFFFFFF


def test_siphash_reference_vector():
    # SipHash-2-4 paper, appendix A: key 00..0f, message 00..0e
    assert cookies.siphash(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_cookie_matches_kernel_synack(vector):
    snap = decode(bytes.fromhex(vector["snapshot"]))
    src, dst = ipaddress.ip_address(vector["src"]), ipaddress.ip_address(vector["dst"])
    cookie = cookies.make_cookie(snap, src, dst, vector["sport"], vector["dport"], vector["isn"], 1460)
    assert cookie == vector["synack_seq"]
    assert (cookies.check_cookie(snap, src, dst, vector["sport"], vector["dport"], vector["isn"], cookie)
            == cookies.encoded_mss(vector["version"], 1460))


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_cookie_check_rejects_tampering_and_age(vector):
    snap = decode(bytes.fromhex(vector["snapshot"]))
    src, dst = ipaddress.ip_address(vector["src"]), ipaddress.ip_address(vector["dst"])
    args = (snap, src, dst, vector["sport"], vector["dport"], vector["isn"])
    cookie = vector["synack_seq"]
    assert cookies.check_cookie(*args, (cookie + (1 << 12)) & U32) is None  # hash bits
    assert cookies.check_cookie(snap, src, dst, vector["sport"] ^ 1, vector["dport"], vector["isn"], cookie) is None
    count = snap.cookie_count
    assert cookies.check_cookie(*args, cookie, count=count + 1) is not None  # one minute old: accepted
    assert cookies.check_cookie(*args, cookie, count=count + 2) is None      # two minutes: refused


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_plain_isn_and_timestamp_offset_match_kernel(vector):
    # The SYN-ACK went out shortly before this snapshot was taken.
    snap = decode(bytes.fromhex(vector["snapshot_after_plain"]))
    src, dst = ipaddress.ip_address(vector["src"]), ipaddress.ip_address(vector["dst"])
    hashed, ts_off = cookies.isn_and_ts_offset(snap, dst, src, vector["plain_dport"], vector["plain_sport"],
                                               realtime_ns=0)
    assert 0 <= hashed <= U32 and 0 < ts_off <= U32
    isn_clock = (vector["plain_seq"] - hashed) & U32          # realtime_ns >> 6 when it was sent
    assert 0 <= ((snap.realtime_ns >> 6) - isn_clock) & U32 < (1 << 24)   # within ~1 s before
    ts_clock = (vector["plain_tsval"] - ts_off) & U32          # tcp_clock_ms when it was sent
    assert 0 <= (snap.tcp_clock_ms - ts_clock) & U32 < 1000
    # A wrong key moves both far away: the checks above can fail.
    wrong = decode(bytes.fromhex(vector["snapshot_after_plain"]))
    object.__setattr__(wrong, "net_secret", bytes(16))
    other, other_ts = cookies.isn_and_ts_offset(wrong, dst, src, vector["plain_dport"], vector["plain_sport"], 0)
    assert (other, other_ts) != (hashed, ts_off)


def test_mss_encoding_tables():
    assert [cookies.encoded_mss(4, m) for m in (100, 536, 1299, 1300, 1460, 9000)] == [536, 536, 536, 1300, 1460, 1460]
    assert [cookies.encoded_mss(6, m) for m in (1220, 1460, 1500, 9000)] == [1220, 1440, 1440, 8940]


def test_cookie_tsval_encodes_options_below_the_clock():
    ts = cookies.cookie_tsval(1_000_000, wscale=7, sack=True, ecn=False)
    assert ts & 0x3F == 7 | cookies.TS_SACK and ts <= 1_000_000 and 1_000_000 - ts < 64
    assert cookies.cookie_tsval(1_000_000, None, False, True) & 0x3F == 0xF | cookies.TS_ECN
    # options above the clock's low bits push the value one 64 ms step back
    assert cookies.cookie_tsval(64, 7, False, False, ts_off=10) == 7 + 10


# --- the module's clocks (ABI 2) -------------------------------------------------

def wall_mode(vector: dict, **changes: object):
    """The vector's kernel with an ABI-2 module in wall mode (hook on, ts_secret of its own)."""
    old = decode(bytes.fromhex(vector["snapshot"]))
    fields = dict(abi_version=2, size=200, flags=old.flags | F_WALL_CLOCK | F_TS_OFFSET_HOOK | F_TS_SECRET,
                  cookie_clock=CLOCK_WALL, cookie_count=DERIVED, ts_secret=bytes(range(0x30, 0x40)),
                  ts_shift_ms=cookies.wall_ts_shift_ms(old.realtime_ns // 10**6, old.tcp_clock_ms))
    fields.update(changes)
    return dataclasses.replace(old, **fields)


def test_cookie_counters():
    assert cookies.wall_cookie_count(60 * 10**9 * 5 - 1) == 4
    assert cookies.wall_cookie_count(60 * 10**9 * 5) == 5
    assert cookies.wall_cookie_count(60 * 10**9 * (1 << 32) + 7) == 0  # 32 bits, as in the kernel
    assert cookies.jiffies_cookie_count(60 * 250 * 3 + 14_999, 250) == 3


def test_wall_ts_shift_is_wall_lead_rounded_to_64():
    shift = cookies.wall_ts_shift_ms(1_000_000, 400)
    assert shift % 64 == 0 and shift == (1_000_000 - 400 + 5000) // 64 * 64
    assert cookies.wall_ts_shift_ms(100, 1 << 33) == ((100 - (1 << 33) + 5000) & ~63) & U32


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_cookie_count_at_follows_the_clock(vector):
    wall = wall_mode(vector)
    later = wall.realtime_ns + 61 * 10**9
    assert cookies.cookie_count_at(wall, later) == later // (60 * 10**9)
    stock = decode(bytes.fromhex(vector["snapshot"]))
    assert cookies.cookie_count_at(stock, stock.realtime_ns) == stock.cookie_count
    assert cookies.cookie_count_at(stock, stock.realtime_ns + 60 * 10**9) == stock.cookie_count + 1


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_wall_mode_cookie_uses_the_snapshot_counter(vector):
    wall = wall_mode(vector)
    src, dst = ipaddress.ip_address(vector["src"]), ipaddress.ip_address(vector["dst"])
    args = (src, dst, vector["sport"], vector["dport"], vector["isn"])
    cookie = cookies.make_cookie(wall, *args, 1460)
    assert cookie == cookies.make_cookie(wall, *args, 1460, count=wall.realtime_ns // (60 * 10**9))
    assert cookie != vector["synack_seq"]  # the recorded (jiffies) cookie is a different minute
    secret = wall.syncookie_secret if vector["version"] == 4 else wall.syncookie6_secret
    assert cookies.cookie_isn(secret, *args, 1460, wall.cookie_count) == cookie
    assert cookies.cookie_mss(secret, *args, cookie, wall.cookie_count) == cookies.encoded_mss(vector["version"], 1460)
    assert cookies.check_cookie(wall, *args, cookie) == cookies.encoded_mss(vector["version"], 1460)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"ipv{v['version']}")
def test_ts_offset_hook_is_ts_secret_hash_plus_shift(vector):
    wall = wall_mode(vector)
    src, dst = ipaddress.ip_address(vector["src"]), ipaddress.ip_address(vector["dst"])
    seq, ts_off = cookies.isn_and_ts_offset(wall, dst, src, vector["plain_dport"], vector["plain_sport"], 0)
    base = cookies.siphash(wall.ts_secret, dst.packed + src.packed) & U32
    assert base == cookies.ts_base(wall.ts_secret, dst, src)
    assert ts_off == (base + wall.ts_shift_ms) & U32
    # the ISN stays the kernel's: net_secret's hash, unchanged by the hook
    stock_seq, _ = cookies.isn_and_ts_offset(decode(bytes.fromhex(vector["snapshot"])), dst, src,
                                              vector["plain_dport"], vector["plain_sport"], 0)
    assert seq == stock_seq
    # tcp_timestamps=2: no per-connection part, the shift stays
    assert cookies.isn_and_ts_offset(dataclasses.replace(wall, tcp_timestamps=2), dst, src, 1, 2)[1] == wall.ts_shift_ms
    # jiffies mode with the hook: the hash alone
    jiffies = wall_mode(vector, flags=wall.flags & ~F_WALL_CLOCK, cookie_clock=0, ts_shift_ms=0)
    assert cookies.isn_and_ts_offset(jiffies, dst, src, 1, 2)[1] == base


def test_wall_mode_cookie_tsval_leads_the_wall_clock_by_about_5s():
    wall_ms, tcp_ms = 1_795_455_915_893, 9_000
    shift = cookies.wall_ts_shift_ms(wall_ms, tcp_ms)
    for elapsed in (0, 1, 63, 64, 100_000):
        tsval = cookies.cookie_tsval(tcp_ms + elapsed, 7, True, False, ts_off=shift)
        lead = tsval - ((wall_ms + elapsed) & U32)
        # rounding: the shift loses up to 63 ms, the option bits up to 127 ms
        assert 5000 - 63 - 127 <= lead <= 5000 and tsval & 0x3F == 7 | cookies.TS_SACK
