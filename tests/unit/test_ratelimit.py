"""Per-source token buckets, driven by a fake clock."""

from __future__ import annotations

import pytest

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


def test_a_full_table_forgets_the_source_seen_least_recently():
    clock = FakeClock()
    limiter = SourceRateLimiter(rate=1.0, burst=2, clock=clock, max_sources=3)
    for source in ("a", "b", "c"):
        limiter.allow(source)
    limiter.allow("c")
    limiter.allow("a")  # a was seen last, b least recently
    limiter.allow("d")
    assert len(limiter) == 3
    assert not limiter.allow("a") and not limiter.allow("c")  # both kept, both empty
    assert limiter.allow("b") and limiter.allow("b") and not limiter.allow("b")  # b forgotten: a new bucket


@pytest.mark.parametrize("rate, burst, max_sources", [(0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_nonsense_settings_rejected(rate, burst, max_sources):
    with pytest.raises(ValueError):
        SourceRateLimiter(rate=rate, burst=burst, max_sources=max_sources)
