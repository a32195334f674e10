"""MitigatorV2308, fed by our `get` answer, reproduces every isn_sync 26.04 vector exactly.

vectors/isn_sync-26.04.json was recorded from a real kernel (Debian 11,
5.10.0-32) with the public isn_sync 26.04 module loaded: its secrets and
sysctls, and for each SYN the SYN-ACK's ISN (and TSval) with the wall clock
just before the SYN and just after the SYN-ACK.  Our agent's `get` text,
made from a snapshot holding those secrets, must let the emulator compute
the very same ISNs — that is the contract MITIGATOR v23.08+ relies on.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Dict

import pytest


from mitigator_agent import cookies
from mitigator_agent.answers import HostFacts, get_text
from mitigator_agent.snapshot import (
    ABI_VERSION,
    CLOCK_WALL,
    F_ALG_TS_SECRET,
    F_COOKIE_ACCEPT,
    F_NET_SECRET,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_OFFSET_HOOK,
    F_TS_SECRET,
    F_WALL_CLOCK,
    STRUCT_SIZE,
    Snapshot,
)
from tests.emulators import MitigatorV2308

RECORDED: Dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "isn_sync-26.04.json").read_text())
VECTORS = RECORDED["vectors"]
U32 = 0xFFFFFFFF
TS_OPTION_BITS_SACK_WSCALE7 = 0b010111


def recorded_kernel(realtime_ns: int) -> Snapshot:
    """A wall-mode snapshot holding the recorded secrets and sysctls, taken at ``realtime_ns``."""
    secrets = {name: bytes.fromhex(value) for name, value in RECORDED["secrets"].items()}
    sysctls = {name: int(value) for name, value in RECORDED["sysctls"].items()}
    tcp_clock_ms = 3_600_000  # an hour of uptime; the emulator never sees it
    return Snapshot(
        abi_version=ABI_VERSION, size=STRUCT_SIZE,
        flags=(F_SYNCOOKIE | F_SYNCOOKIE6 | F_NET_SECRET | F_TS_SECRET | F_ALG_TS_SECRET | F_COOKIE_ACCEPT
               | F_WALL_CLOCK | F_TS_OFFSET_HOOK),
        hz=RECORDED["hz"], realtime_ns=realtime_ns, tcp_clock_ms=tcp_clock_ms,
        jiffies64=(1 << 32) - 300 * 250 + tcp_clock_ms // 4,
        cookie_clock=CLOCK_WALL, ts_shift_ms=cookies.wall_ts_shift_ms(realtime_ns // 10**6, tcp_clock_ms),
        **secrets, **sysctls,
    )


SNAPSHOT = recorded_kernel(VECTORS[0]["wall_ns_before"] - 3 * 10**9)
GET_TEXT = get_text(SNAPSHOT, HostFacts("Linux", RECORDED["kernel"], "0.test", None))
MITIGATOR = MitigatorV2308.from_get(GET_TEXT)


def addresses(vector: Dict[str, Any]):
    return ipaddress.ip_address(vector["saddr"]), ipaddress.ip_address(vector["daddr"])


def syn_mss(vector: Dict[str, Any]) -> int:
    found = re.match(r"mss(\d+)", vector["syn_options"])
    assert found, vector["syn_options"]
    return int(found.group(1))


def vector_id(vector: Dict[str, Any]) -> str:
    return f"v{vector['family']}-{vector['sport']}" + ("-ts" if vector["synack_tsval"] else "")


def test_the_emulator_knows_only_the_get_text_and_it_is_isn_syncs():
    assert GET_TEXT.count("\n") == 11
    assert (MITIGATOR.uname, MITIGATOR.version) == ("Linux", "26.04")
    assert MITIGATOR.syncookie_secret.hex() == RECORDED["secrets"]["syncookie_secret"]
    assert MITIGATOR.ts_secret.hex() == RECORDED["secrets"]["ts_secret"]
    assert MITIGATOR.tcp_timestamps == int(RECORDED["sysctls"]["tcp_timestamps"])
    assert len(VECTORS) == 4  # every recorded vector is checked below


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_cookie_isn_reproduces_the_recorded_synack(vector):
    before, after = vector["wall_ns_before"], vector["wall_ns_after"]
    # the SYN-ACK was made at some moment in between: the counter must not have moved
    assert MitigatorV2308.count(before) == MitigatorV2308.count(after) == before // (60 * 10**9)
    saddr, daddr = addresses(vector)
    for wall_ns in (before, after):
        assert MITIGATOR.cookie(saddr, daddr, vector["sport"], vector["dport"], vector["syn_seq"],
                                syn_mss(vector), wall_ns) == vector["synack_isn"]
    # the same with the addresses as strings, as a caller may hold them
    assert MITIGATOR.cookie(vector["saddr"], vector["daddr"], vector["sport"], vector["dport"],
                            vector["syn_seq"], syn_mss(vector), before) == vector["synack_isn"]


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_a_different_minute_or_secret_misses(vector):
    saddr, daddr = addresses(vector)
    args = (saddr, daddr, vector["sport"], vector["dport"], vector["syn_seq"], syn_mss(vector))
    assert MITIGATOR.cookie(*args, vector["wall_ns_before"] + 60 * 10**9) != vector["synack_isn"]
    wrong = MitigatorV2308.from_get(GET_TEXT.replace(RECORDED["secrets"]["syncookie_secret"][:2], "00", 1)
                                    .replace(RECORDED["secrets"]["syncookie6_secret"][:2], "00", 1))
    assert wrong.cookie(*args, vector["wall_ns_before"]) != vector["synack_isn"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["synack_tsval"]], ids=vector_id)
def test_tsval_is_ts_secret_plus_wall_clock_and_carries_the_options(vector):
    saddr, daddr = addresses(vector)  # the SYN's: the server picks the offset, so (daddr, saddr)
    tsval, wall_ms = vector["synack_tsval"], vector["wall_ns_before"] // 10**6
    assert MITIGATOR.tsval_ok(tsval, daddr, saddr, wall_ms)
    assert (tsval - MITIGATOR.ts_base(daddr, saddr)) & 0x3F == TS_OPTION_BITS_SACK_WSCALE7
    assert MITIGATOR.ts_options(tsval, daddr, saddr) == {"wscale": 7, "sack": True, "ecn": False}
    assert MITIGATOR.ts_options((tsval - MITIGATOR.ts_base(daddr, saddr)) & U32) == {
        "wscale": 7, "sack": True, "ecn": False}
    # the window is tight enough to mean something
    assert not MITIGATOR.tsval_ok(tsval, daddr, saddr, wall_ms + 400)
    assert not MITIGATOR.tsval_ok(tsval, daddr, saddr, wall_ms - 400)
    other = MitigatorV2308.from_get(GET_TEXT.replace(RECORDED["secrets"]["ts_secret"], "ab" * 16))
    assert not other.tsval_ok(tsval, daddr, saddr, wall_ms)


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_a_cookie_ack_the_emulator_builds_passes_the_kernel_check(vector):
    saddr, daddr = addresses(vector)
    sport, dport, client_isn, mss = vector["sport"], vector["dport"], vector["syn_seq"] ^ 0x5A5A, syn_mss(vector)
    wall_ns = vector["wall_ns_before"]
    ack = (MITIGATOR.cookie(saddr, daddr, sport, dport, client_isn, mss, wall_ns) + 1) & U32
    seq = (client_isn + 1) & U32
    kernel = recorded_kernel(wall_ns + 10**9)  # the server sees the ACK a second later
    count = cookies.wall_cookie_count(wall_ns)
    expected_mss = cookies.encoded_mss(vector["family"], mss)
    assert kernel.cookie_count == count
    assert cookies.check_cookie(kernel, saddr, daddr, sport, dport, (seq - 1) & U32, (ack - 1) & U32,
                                count=count) == expected_mss
    assert cookies.check_cookie(kernel, saddr, daddr, sport, dport, (seq - 1) & U32, (ack - 1) & U32) == expected_mss
    # accepted a minute later, refused two minutes later, as the kernel does
    assert cookies.check_cookie(kernel, saddr, daddr, sport, dport, client_isn, (ack - 1) & U32,
                                count=count + 1) == expected_mss
    assert cookies.check_cookie(kernel, saddr, daddr, sport, dport, client_isn, (ack - 1) & U32,
                                count=count + 2) is None
    assert MITIGATOR.check_cookie(saddr, daddr, sport, dport, client_isn, (ack - 1) & U32,
                                  wall_ns + 60 * 10**9) == expected_mss
