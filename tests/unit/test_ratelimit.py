"""Per-source token buckets, driven by a fake clock."""

from __future__ import annotations

import pytest

from mitigator_agent import ratelimit
from mitigator_agent.ratelimit import SourceRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_then_refilled_at_rate():
    clock = FakeClock()
    limiter = SourceRateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back
    assert [limiter.allow("192.0.2.1") for _ in range(2)] == [True, False]
    clock.now += 100  # never more than the burst
    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]


def test_sources_have_separate_buckets():
    limiter = SourceRateLimiter(rate=0.001, burst=1, clock=FakeClock())
    assert limiter.allow("192.0.2.1") and not limiter.allow("192.0.2.1")
    assert limiter.allow("2001:db8::1")


def test_full_buckets_are_pruned_when_the_table_grows(monkeypatch):
    monkeypatch.setattr(ratelimit, "PRUNE_ABOVE", 3)
    clock = FakeClock()
    limiter = SourceRateLimiter(rate=1.0, burst=2, clock=clock)
    for source in ("a", "b", "c"):
        limiter.allow(source)
    limiter.allow("c")  # c is empty now
    clock.now += 1.0    # a and b are full again, c holds one token
    limiter.allow("d")
    assert len(limiter) == 2  # a and b dropped; c (still limited) and d kept
    assert limiter.allow("c") and not limiter.allow("c")


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0)])
def test_nonsense_settings_rejected(rate, burst):
    with pytest.raises(ValueError):
        SourceRateLimiter(rate=rate, burst=burst)
