"""Log lines stay single lines whatever a client sends."""

from __future__ import annotations

from mitigator_agent.logs import MAX_VALUE_CHARS, event, quote


def test_plain_values_stay_bare():
    assert event("poll", src="127.0.0.1:5", key="SHA256:ab+/c", status=0) == \
        "poll src=127.0.0.1:5 key=SHA256:ab+/c status=0"


def test_values_with_spaces_quotes_or_control_characters_are_escaped():
    assert quote("get json") == '"get json"'
    assert quote('a"b') == '"a\\"b"'
    assert quote("get\nINFO poll fake=1") == '"get\\nINFO poll fake=1"'
    assert quote("\udcff") == '"\\udcff"'  # an undecodable byte from the network
    assert quote("") == '""'


def test_none_fields_are_left_out():
    assert event("refused", src="[::1]:2", user=None, request="pty") == "refused src=[::1]:2 request=pty"


def test_long_values_are_cut():
    quoted = quote("x" * 5000)
    assert quoted == '"' + "x" * MAX_VALUE_CHARS + '...(5000 chars)"'
    assert "\n" not in quoted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_aggregated_per_source_per_window():
    from mitigator_agent.logs import RefusalAggregator
    clock = FakeClock()
    aggregator = RefusalAggregator(window=60, lines=10, clock=clock)
    own = [aggregator.note("192.0.2.1")[0] for _ in range(3000)]
    assert own.count(True) == 10 and own[:10] == [True] * 10  # 3,000 refusals, 10 lines
    assert aggregator.note("192.0.2.2") == (True, None)         # another source has its own lines
    assert aggregator.flush() == []                             # window still open
    clock.now += 60
    assert aggregator.flush() == ["... and 2990 more from 192.0.2.1 in 60 s"]
    assert len(aggregator) == 0


def test_the_summary_also_comes_with_the_next_refusal_of_that_source():
    from mitigator_agent.logs import RefusalAggregator
    clock = FakeClock()
    aggregator = RefusalAggregator(window=60, lines=1, clock=clock)
    aggregator.note("2001:db8::/64")
    aggregator.note("2001:db8::/64")
    clock.now += 61
    assert aggregator.note("2001:db8::/64") == (True, "... and 1 more from 2001:db8::/64 in 60 s")


def test_sources_tracked_at_once_are_bounded_and_the_rest_summarised_together():
    from mitigator_agent.logs import RefusalAggregator
    clock = FakeClock()
    aggregator = RefusalAggregator(window=60, lines=10, clock=clock, max_sources=100)
    own = [aggregator.note(f"2001:db8:0:{n:x}::/64")[0] for n in range(65536)]
    assert own.count(True) == 100 and len(aggregator) == 100
    clock.now += 60
    assert aggregator.flush() == ["... and 65436 more from other sources in 60 s"]
