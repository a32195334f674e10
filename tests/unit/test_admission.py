"""Admission before authentication (issue 9, "Admission that MITIGATOR always gets").

Driven by a fake clock: the pools, the per-source count (IPv4 address, IPv6
/48), penalties that grow with repeated offences, and which from= patterns
name MITIGATOR's sources.
"""

from __future__ import annotations

from typing import Callable

import pytest

from mitigator_agent.authkeys import names_particular_sources
from mitigator_agent.ratelimit import (
    MAX_SOURCES,
    Admission,
    PenaltyBox,
    PenaltySettings,
    SourceRateLimiter,
    Ticket,
    source_bucket,
)

MITIGATOR = "192.0.2.10"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(clock: FakeClock, stranger_slots: int = 4, per_source: int = 2, allowed_slots: int = 2,
              is_allowed: Callable[[str], bool] = lambda address: address == MITIGATOR,
              burst: int = 100) -> Admission:
    return Admission(stranger_slots, per_source, allowed_slots, rate=1.0, burst=burst,
                     is_allowed=is_allowed, clock=clock)


@pytest.mark.parametrize("address, bucket", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2::99", "2001:db8:1::/48"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1::/48"),
    ("2001:db8:1:ffff::1", "2001:db8:1::/48"),   # another /64 of the same /48: the same stranger
    ("2001:db8:2::1", "2001:db8:2::/48"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("::1", "::/48"),
    ("not an address", "not an address"),
])
def test_strangers_are_counted_per_ipv4_address_and_per_ipv6_48(address, bucket):
    assert source_bucket(address) == bucket


def test_strangers_filling_their_pool_never_take_mitigators_slots():
    # The lock-out: the shared cap taken by four sources.  Now the
    # strangers' pool is full and MITIGATOR is still admitted.
    gate = admission(FakeClock())
    strangers = [gate.admit(f"198.51.100.{n}") for n in (1, 1, 2, 2)]
    assert all(isinstance(ticket, Ticket) for ticket in strangers)
    assert gate.admit("198.51.100.3") == "too many unauthenticated connections (4)"
    assert gate.admit(MITIGATOR) == Ticket(MITIGATOR, True)
    assert gate.counts() == (4, 1)


def test_one_ipv6_site_cycling_addresses_of_its_48_gets_only_the_per_source_cap():
    gate = admission(FakeClock())
    assert isinstance(gate.admit("2001:db8::1"), Ticket)
    assert isinstance(gate.admit("2001:db8:0:1::2"), Ticket)  # another /64 of the same /48
    assert gate.admit("2001:db8:0:ffff::3") == "too many unauthenticated connections from 2001:db8::/48 (2)"
    assert isinstance(gate.admit("2001:db8:1::1"), Ticket)  # the next /48 is another source


def test_released_tickets_free_their_slots():
    gate = admission(FakeClock(), per_source=1)
    ticket = gate.admit("198.51.100.1")
    assert isinstance(ticket, Ticket)
    assert isinstance(gate.admit("198.51.100.1"), str)
    gate.release(ticket)
    assert isinstance(gate.admit("198.51.100.1"), Ticket)
    allowed = gate.admit(MITIGATOR)
    assert isinstance(allowed, Ticket)
    gate.release(allowed)
    assert gate.counts() == (1, 0)


def test_the_allowed_pool_has_its_own_cap():
    gate = admission(FakeClock(), allowed_slots=1)
    assert isinstance(gate.admit(MITIGATOR), Ticket)
    assert gate.admit(MITIGATOR) == "too many unauthenticated connections from allowed sources (1)"


def test_strangers_pass_a_token_bucket_per_source_and_allowed_sources_do_not():
    gate = admission(FakeClock(), stranger_slots=100, per_source=100, allowed_slots=100, burst=2)
    assert [isinstance(gate.admit("198.51.100.1"), Ticket) for _ in range(3)] == [True, True, False]
    assert all(isinstance(gate.admit(MITIGATOR), Ticket) for _ in range(10))


def test_penalties_grow_with_each_offence_until_the_source_is_refused_for_a_while():
    clock = FakeClock()
    box = PenaltyBox(PenaltySettings(noauth=1, authfail=5, grace_exceeded=10, min_seconds=15, max_seconds=600),
                     clock)
    assert box.add("198.51.100.1", "grace_exceeded") == (10.0, False)  # one timeout locks nobody out
    assert box.refused_for("198.51.100.1") == 0
    assert box.add("198.51.100.1", "grace_exceeded") == (20.0, True)   # the second one does
    assert box.refused_for("198.51.100.1") == 5.0
    assert box.add("198.51.100.1", "authfail") == (25.0, False)        # already refused: grows
    assert box.refused_for("198.51.100.1") == 10.0
    clock.now += 10
    assert box.refused_for("198.51.100.1") == 0                        # served its time
    clock.now += 15
    assert box.remaining("198.51.100.1") == 0 and len(box) == 0


def test_penalties_are_capped():
    box = PenaltyBox(PenaltySettings(max_seconds=60), FakeClock())
    for _ in range(100):
        box.add("198.51.100.1", "grace_exceeded")
    assert box.remaining("198.51.100.1") == 60.0


def test_a_penalised_64_is_refused_and_mitigator_is_never_penalised():
    clock = FakeClock()
    gate = admission(clock)
    for n in range(4):  # 4 x 5 s of authfail: past the 15 s threshold
        ticket = gate.admit(f"2001:db8::{n + 1}")
        assert isinstance(ticket, Ticket)
        gate.release(ticket)
        gate.penalise(ticket, "authfail")
    refusal = gate.admit("2001:db8:0:99::1")
    assert isinstance(refusal, str) and refusal.startswith("source 2001:db8::/48 penalised for ")
    mitigator = gate.admit(MITIGATOR)
    assert isinstance(mitigator, Ticket)
    assert gate.penalise(mitigator, "grace_exceeded") == (0.0, False)
    assert gate.penalties.remaining(MITIGATOR) == 0


@pytest.mark.parametrize("patterns, names", [
    ((), False),                                  # no from=: admits everyone, names nobody
    (("192.0.2.10",), True),
    (("192.0.2.0/24,2001:db8::/32",), True),
    (("10.1.*",), True),
    (("*",), False),
    (("*.*.*.*",), False),
    (("192.0.2.10,*",), False),
    (("!192.0.2.66,*",), False),
    (("0.0.0.0/0",), False),
    (("::/0",), False),
    (("!10.0.0.0/8,192.0.2.10",), True),
])
def test_only_from_patterns_that_name_particular_sources_make_them_mitigators(patterns, names):
    # A from="*" key would otherwise turn every stranger into an allowed
    # source, and the pool strangers cannot exhaust would be theirs.
    assert names_particular_sources(patterns) is names


# --- bounded tables: a flood from very many sources --------------------------------

def flood_address(n: int) -> str:
    """The n-th of a flood's sources: IPv4 addresses and IPv6 /48s, all distinct."""
    if n % 2:
        return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    return f"2001:{n >> 16 & 0xffff:x}:{n & 0xffff:x}::1"


def test_a_flood_from_a_million_sources_keeps_the_rate_and_penalty_tables_at_their_cap():
    clock = FakeClock()
    limiter = SourceRateLimiter(rate=2.0, burst=20, clock=clock)
    box = PenaltyBox(SETTINGS, clock)
    for n in range(1_000_000):
        # Each source connects once and times out: one rate bucket (not
        # refilled) and one penalty (not expired) each.
        source = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert limiter.allow(source)
        box.add(source, "grace_exceeded")
        clock.now += 1e-6
    assert len(limiter) == len(box) == MAX_SOURCES
    assert len(box._ending) <= 2 * MAX_SOURCES + 64  # its heap of end times too, stale entries included


def test_admission_keeps_its_tables_at_the_cap_it_is_given():
    clock = FakeClock()
    gate = Admission(stranger_slots=16, per_source=4, allowed_slots=16, rate=2.0, burst=20,
                     is_allowed=lambda address: False, clock=clock, max_sources=1000)
    for n in range(20_000):  # IPv4 addresses and IPv6 /48s, through admission as the server does it
        ticket = gate.admit(flood_address(n))
        assert isinstance(ticket, Ticket)
        gate.release(ticket)
        gate.penalise(ticket, "grace_exceeded")
        clock.now += 1e-6
    assert len(gate.limiter) == len(gate.penalties) == 1000
    assert gate.counts() == (0, 0)


SETTINGS = PenaltySettings(noauth=1, authfail=5, grace_exceeded=10, min_seconds=15, max_seconds=600)


def test_a_refused_source_outlives_a_flood_of_newcomers_in_a_full_penalty_table():
    clock = FakeClock()
    box = PenaltyBox(SETTINGS, clock, max_sources=1000)
    for _ in range(60):
        box.add("198.51.100.1", "grace_exceeded")  # refused for the maximum
    for n in range(100_000):  # a hundred times the table: newcomers, some refused themselves
        for _ in range(1 + n % 3):
            box.add(flood_address(n), "grace_exceeded")
        clock.now += 1e-4
    assert len(box) == 1000
    assert box.refused_for("198.51.100.1") > 500


def test_a_refused_source_is_never_forgotten_while_refused():
    clock = FakeClock()
    box = PenaltyBox(SETTINGS, clock, max_sources=100)
    for _ in range(3):
        box.add("198.51.100.1", "grace_exceeded")  # owes 30 s: refused for 15
    for n in range(99):
        for _ in range(4):
            box.add(flood_address(n), "grace_exceeded")  # 40 s each: the table is full
    for n in range(100, 1100):
        for _ in range(4):  # newcomers' offences find no room: the refused source is kept
            assert box.add(flood_address(n), "grace_exceeded") == (0.0, False)
    assert box.refused_for("198.51.100.1") == 15
    clock.now += 16  # owes 14 s: no longer refused, still more than a newcomer's 10
    assert box.add(flood_address(100), "grace_exceeded") == (0.0, False)
    assert box.remaining("198.51.100.1") == 14
    clock.now += 5  # owes 9 s: now a newcomer's offence (10 s) takes its place
    assert box.add(flood_address(100), "grace_exceeded") == (10.0, False)
    assert box.remaining("198.51.100.1") == 0 and len(box) == 100


def test_an_emptied_rate_bucket_is_forgotten_only_after_as_many_other_sources_as_the_table_holds():
    limiter = SourceRateLimiter(rate=0.001, burst=5, clock=FakeClock(), max_sources=1000)
    while limiter.allow("198.51.100.1"):
        pass
    for n in range(999):
        assert limiter.allow(flood_address(n))
    assert not limiter.allow("198.51.100.1")  # still empty: it was just seen again
    for n in range(999, 1998):
        limiter.allow(flood_address(n))
    assert not limiter.allow("198.51.100.1")
    for n in range(1998, 2998):
        limiter.allow(flood_address(n))
    # 1000 others since it was last seen: a fresh bucket, as a new address would get.
    assert [limiter.allow("198.51.100.1") for _ in range(6)] == [True] * 5 + [False]
