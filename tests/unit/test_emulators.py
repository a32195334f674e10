"""tests/emulators.py: strict parsing, and both consumers agree with the agent's kernel model.

The kernel model (mitigator_agent.cookies with a wall-mode snapshot) is what
the module makes the kernel do; the consumers see only answer texts.  If
they predict the model's cookies and TSvals, the texts carry the contract.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest


from mitigator_agent import cookies
from mitigator_agent.answers import get_text, legacy_text
from tests.emulators import LegacyConsumer, MitigatorV2308, decode_ts_options
from test_answers import FACTS, JIFFIES_SNAP, SNAP, GET, LEGACY

U32 = 0xFFFFFFFF
CLIENT4, SERVER4 = ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("198.51.100.1")
CLIENT6, SERVER6 = ipaddress.ip_address("2001:db8::7"), ipaddress.ip_address("2001:db8:1::1")
PAIRS = [(CLIENT4, SERVER4), (CLIENT6, SERVER6)]


# --- parsing ----------------------------------------------------------------------

def test_from_get_reads_our_answer():
    emulator = MitigatorV2308.from_get(GET)
    assert (emulator.uname, emulator.version, emulator.time) == ("Linux", "26.04", 1763894400)
    assert (emulator.net_secret, emulator.ts_secret) == (SNAP.net_secret, SNAP.ts_secret)
    assert (emulator.tcp_ecn, emulator.tcp_sack, emulator.tcp_timestamps, emulator.tcp_window_scaling) == (2, 1, 1, 1)
    assert SNAP.net_secret.hex() not in repr(emulator)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t + "jiffies: 1\n", "12 lines, expected 11"),
    (lambda t: t.replace("tcp_ecn: 2\n", ""), "10 lines, expected 11"),
    (lambda t: t[:-1], "does not end with a newline"),
    (lambda t: t.replace("tcp_sack: 1\ntcp_timestamps: 1", "tcp_timestamps: 1\ntcp_sack: 1"),
     "line 9 is not `tcp_sack: VALUE`"),
    (lambda t: t.replace("uname: ", "uname:"), "line 1 is not `uname: VALUE`"),
    (lambda t: t.replace("a0a1a2", "A0A1A2"), "net_secret is not 32 lowercase hex digits"),
    (lambda t: t.replace("c0c1c2", "c0c1"), "ts_secret is not 32 lowercase hex digits"),
    (lambda t: t.replace("tcp_ecn: 2", "tcp_ecn: two"), "tcp_ecn is not a decimal number"),
    (lambda t: t.replace("\n", "\r\n"), r"line 1 \(uname\) has an empty or malformed value"),
    (lambda t: t.replace("version: 26.04", "version: "), r"line 2 \(version\) has an empty"),
])
def test_from_get_is_strict(damage, message):
    with pytest.raises(ValueError, match=message):
        MitigatorV2308.from_get(damage(GET))


def test_from_text_reads_the_legacy_text_strictly():
    legacy = LegacyConsumer.from_text(LEGACY)
    assert (legacy.time_ms, legacy.uptime_ms, legacy.jiffies, legacy.hz) == (
        1763894400123, 2957813705, 440973600030, 250)
    assert LegacyConsumer.from_text(LEGACY, hz=1000).hz == 1000
    with pytest.raises(ValueError, match="line 3 is not `uptime_ms VALUE`"):
        LegacyConsumer.from_text(LEGACY.replace("uptime_ms", "uptime"))
    with pytest.raises(ValueError, match="8 lines, expected 7"):
        LegacyConsumer.from_text(LEGACY + "extra 1\n")


def test_ts_option_bits():
    assert decode_ts_options(0b010111) == {"wscale": 7, "sack": True, "ecn": False}
    assert decode_ts_options(0b101111 | 0x1000) == {"wscale": None, "sack": False, "ecn": True}
    with pytest.raises(ValueError, match="both addresses or neither"):
        MitigatorV2308.from_get(GET).ts_options(1, SERVER4)


# --- MITIGATOR v23.08 against the kernel model ---------------------------------------

@pytest.mark.parametrize("client, server", PAIRS)
def test_v2308_predicts_the_wall_mode_kernel(client, server):
    emulator = MitigatorV2308.from_get(get_text(SNAP, FACTS))
    version = client.version
    for wall_ns in (SNAP.realtime_ns, SNAP.realtime_ns + 90 * 10**9):
        count = cookies.cookie_count_at(SNAP, wall_ns)
        assert emulator.cookie(client, server, 40000, 443, 12345, 1460, wall_ns) == cookies.make_cookie(
            SNAP, client, server, 40000, 443, 12345, 1460, count=count)
    # the kernel's TSval for a cookie SYN-ACK: its clock plus the offset of (server, client)
    _, ts_off = cookies.isn_and_ts_offset(SNAP, server, client, 443, 40000)
    assert emulator.ts_base(server, client) == (ts_off - SNAP.ts_shift_ms) & U32
    for elapsed_ms in (0, 17, 64, 5000, 600_000):
        tsval = cookies.cookie_tsval(SNAP.tcp_clock_ms + elapsed_ms, 7, True, version == 6, ts_off)
        assert emulator.tsval_ok(tsval, server, client, SNAP.realtime_ns // 10**6 + elapsed_ms)
        assert emulator.ts_options(tsval, server, client) == {"wscale": 7, "sack": True, "ecn": version == 6}
    # the order matters: a (client, server) hash is another number
    assert emulator.ts_base(client, server) != emulator.ts_base(server, client)


def test_v2308_without_timestamp_offsets():
    emulator = MitigatorV2308.from_get(get_text(dataclasses.replace(SNAP, tcp_timestamps=2), FACTS))
    assert emulator.ts_base(SERVER4, CLIENT4) == 0


def test_v2308_cannot_follow_the_jiffies_mode_kernel():
    # jiffies mode is the stock counter: a v23.08 MITIGATOR gets other cookies (hence wall mode by default)
    emulator = MitigatorV2308.from_get(get_text(JIFFIES_SNAP, FACTS))
    assert emulator.cookie(CLIENT4, SERVER4, 1, 2, 3, 1460, JIFFIES_SNAP.realtime_ns) != cookies.make_cookie(
        JIFFIES_SNAP, CLIENT4, SERVER4, 1, 2, 3, 1460)


# --- the legacy consumer against the kernel model -------------------------------------

@pytest.mark.parametrize("snap", [SNAP, JIFFIES_SNAP], ids=["wall", "jiffies"])
def test_legacy_consumer_predicts_the_kernel_in_either_mode(snap):
    legacy = LegacyConsumer.from_text(legacy_text(snap), hz=snap.hz)
    # away from minute edges by more than a jiffy: the text's clocks are truncated
    for later_s in (0, 7, 61, 3600):
        wall_ns = snap.realtime_ns + later_s * 10**9
        count = cookies.cookie_count_at(snap, wall_ns)
        assert legacy.count(wall_ns) == count
        assert legacy.cookie(CLIENT4, SERVER4, 40000, 443, 777, 1400, wall_ns) == cookies.make_cookie(
            snap, CLIENT4, SERVER4, 40000, 443, 777, 1400, count=count)
    _, ts_off = cookies.isn_and_ts_offset(snap, SERVER4, CLIENT4, 443, 40000)
    for elapsed_ms in (0, 3, 64, 200, 59_999):
        tsval = cookies.cookie_tsval(snap.tcp_clock_ms + elapsed_ms, 7, True, False, ts_off)
        wall_ns = snap.realtime_ns + elapsed_ms * 10**6
        assert legacy.tsval_ok(tsval, SERVER4, CLIENT4, wall_ns, wall_ns + 10**6)
        assert legacy.tsval(SERVER4, CLIENT4, wall_ns, 7, True, False) in (tsval, (tsval + 64) & U32)
        assert not legacy.tsval_ok(tsval, SERVER4, CLIENT4, wall_ns + 200 * 10**6, wall_ns + 201 * 10**6)


def test_legacy_consumer_has_no_ipv6_secret():
    legacy = LegacyConsumer.from_text(LEGACY)
    with pytest.raises(ValueError, match="IPv4 cookie secret only"):
        legacy.cookie(CLIENT6, SERVER6, 1, 2, 3, 1440, SNAP.realtime_ns)


def test_legacy_text_wall_mode_jiffies_track_the_wall_minute_across_its_edge():
    edge_ns = (SNAP.realtime_ns // (60 * 10**9) + 1) * 60 * 10**9
    legacy = LegacyConsumer.from_text(legacy_text(SNAP))
    assert legacy.count(edge_ns - 10 * 10**6) == SNAP.cookie_count
    assert legacy.count(edge_ns + 10 * 10**6) == SNAP.cookie_count + 1
