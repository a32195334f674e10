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
