"""Server helpers and the env refusal no real client can observe (the rest: tests/integration)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from asyncssh.packet import SSHPacket, String

from mitigator_agent.server import RestrictedChannel, format_address, plain_address


@pytest.mark.parametrize("raw, plain", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:0db8:0000::0001", "2001:db8::1"),
])
def test_plain_address(raw, plain):
    assert plain_address(raw) == plain


def test_format_address():
    assert format_address("192.0.2.1", 7100) == "192.0.2.1:7100"
    assert format_address("::1", 7100) == "[::1]:7100"


class RecordingConnection:
    """Stands in for AgentConnection: records what the channel logs."""

    def __init__(self) -> None:
        self.events: list = []

    def log_event(self, level: int, event: str, /, **fields: object) -> None:
        self.events.append((level, event, fields))


def test_env_request_is_refused_and_logged_without_its_value():
    # OpenSSH and asyncssh send env without asking for a reply, so a real
    # client cannot see the refusal: the handler's answer is checked here.
    channel = SimpleNamespace(connection=RecordingConnection())
    packet = SSHPacket(String(b"LANG") + String(b"secret-looking value"))
    assert RestrictedChannel._process_env_request(channel, packet) is False  # type: ignore[arg-type]
    assert channel.connection.events == [(logging.INFO, "refused", {"request": "env", "name": "LANG"})]
