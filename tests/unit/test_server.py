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


def test_env_request_is_ignored_and_logged_at_debug_without_its_value():
    # OpenSSH and asyncssh send env without asking for a reply, so a real
    # client cannot see the refusal: the handler's answer is checked here.
    channel = SimpleNamespace(connection=RecordingConnection())
    packet = SSHPacket(String(b"LANG") + String(b"secret-looking value"))
    assert RestrictedChannel._process_env_request(channel, packet) is False  # type: ignore[arg-type]
    # Debug, not a refusal: every stock OpenSSH client sends LANG.
    assert channel.connection.events == [(logging.DEBUG, "env-ignored", {"name": "LANG"})]


def kexinit(kex: list, host_key: list, follows: bool) -> bytes:
    """A client KEXINIT payload (message byte included) with these first two lists."""
    from asyncssh.packet import Boolean, Byte, NameList, UInt32
    others = [NameList([b"chacha20-poly1305@openssh.com"])] * 2 + [NameList([])] * 2 \
        + [NameList([b"none"])] * 2 + [NameList([])] * 2
    return (Byte(20) + bytes(16) + NameList(kex) + NameList(host_key) + b"".join(others)
            + Boolean(follows) + UInt32(0))


OURS_KEX = [b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"mlkem768x25519-sha256"]


@pytest.mark.parametrize("client_kex, client_host_key, follows, wrong", [
    # Dropbear 2022.83 guesses curve25519-sha256 / ssh-ed25519: right with our order.
    ([b"curve25519-sha256", b"diffie-hellman-group14-sha256"], [b"ssh-ed25519"], True, False),
    # The case: a client whose first kex is not our first.  asyncssh
    # accepted the guess because the negotiated kex is the client's first;
    # RFC 4253 7.1 (and Dropbear) say the guess is wrong.
    ([b"curve25519-sha256@libssh.org", b"curve25519-sha256"], [b"ssh-ed25519"], True, True),
    # Same kex, another preferred host key algorithm: wrong as well.
    ([b"curve25519-sha256"], [b"rsa-sha2-256", b"ssh-ed25519"], True, True),
    # No guessed packet follows: nothing to ignore.
    ([b"curve25519-sha256@libssh.org"], [b"ssh-ed25519"], False, False),
])
def test_first_kex_guess_is_judged_by_both_sides_first_choices_as_rfc_4253_says(
        client_kex, client_host_key, follows, wrong):
    from mitigator_agent.server import first_kex_guess_is_wrong
    assert first_kex_guess_is_wrong(kexinit(client_kex, client_host_key, follows), OURS_KEX,
                                    [b"ssh-ed25519"]) is wrong


def test_the_kex_guess_rule_is_installed_for_kexinit():
    from asyncssh.constants import MSG_KEXINIT

    from mitigator_agent.server import KexGuessServerConnection
    handler = KexGuessServerConnection._packet_handlers[MSG_KEXINIT]  # type: ignore[attr-defined]
    assert handler is KexGuessServerConnection._process_kexinit_rfc
