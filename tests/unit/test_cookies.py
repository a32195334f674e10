"""mitigator_agent.cookies against fixed vectors.

The vectors in vectors/ were recorded from a real Debian 6.1.0-56-amd64
kernel with the tcpsecrets module (tests/kernel/ re-proves them live on every
run): a /dev/tcpsecrets snapshot, a SYN we sent, and the SYN-ACK the kernel
answered, once with tcp_syncookies=2 (a cookie) and once with 1 (a plain
ISN and timestamp).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from mitigator_agent import cookies
from mitigator_agent.snapshot import decode

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
