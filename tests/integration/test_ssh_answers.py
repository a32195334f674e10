"""Real clients (OpenSSH and asyncssh) get correct answers from the real agent."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from mitigator_agent import __version__, cookies
from mitigator_agent.answers import HostFacts, get_text, json_answer, legacy_text, validate_json_answer
from mitigator_agent.clock import kernel_clock_synced
from mitigator_agent.snapshot import encode
from tests.emulators import LegacyConsumer, MitigatorV2308

HOSTS = ["127.0.0.1", "::1"]


def expected_facts() -> HostFacts:
    return HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())


@pytest.mark.parametrize("host", HOSTS)
def test_openssh_get(agent, client_key, snapshot, host):
    result = agent.ssh(client_key, "get", host=host)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == get_text(snapshot, expected_facts())
    lines = result.stdout.decode().splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        "uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret",
        "ts_secret", "tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling"]
    assert lines[:2] == ["uname: Linux", "version: 26.04"]
    assert f"net_secret: {snapshot.net_secret.hex()}" in lines


@pytest.mark.parametrize("host", HOSTS)
def test_openssh_get_json(agent, client_key, snapshot, host):
    result = agent.ssh(client_key, "get json", host=host)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert validate_json_answer(answer) == []
    assert answer == json_answer(snapshot, expected_facts())
    assert answer["syncookie_secret"] == snapshot.syncookie_secret.hex()


@pytest.mark.parametrize("host", HOSTS)
def test_openssh_legacy_command_and_session_without_command(agent, client_key, snapshot, host):
    by_name = agent.ssh(client_key, "get-tcp-secrets", host=host)
    without_command = agent.ssh(client_key, host=host)  # stdin is not a tty: no PTY, a shell request
    assert by_name.returncode == 0 and without_command.returncode == 0
    assert by_name.stdout.decode() == without_command.stdout.decode() == legacy_text(snapshot)


@pytest.mark.parametrize("host", HOSTS)
def test_asyncssh_client_gets_every_answer(agent, client_key, snapshot, host):
    facts = expected_facts()
    get = agent.asyncssh_run(client_key, "get", host=host)
    assert (get.exit_status, get.stdout) == (0, get_text(snapshot, facts))
    as_json = agent.asyncssh_run(client_key, "get json", host=host)
    assert as_json.exit_status == 0 and json.loads(as_json.stdout) == json_answer(snapshot, facts)
    legacy = agent.asyncssh_run(client_key, "get-tcp-secrets", host=host)
    assert (legacy.exit_status, legacy.stdout) == (0, legacy_text(snapshot))
    no_command = agent.asyncssh_run(client_key, None, host=host)
    assert (no_command.exit_status, no_command.stdout) == (0, legacy_text(snapshot))


@pytest.mark.parametrize("command, message", [
    ("reboot", "unknown command"),
    ("cat /proc/tcp_secrets", "unknown command"),
    ("set;" + ";".join(["00"] * 8), "anycast set is not enabled"),
    ("get;extra", "get takes no arguments"),
])
def test_other_commands_exit_1_with_one_line_on_stderr(agent, client_key, command, message):
    result = agent.ssh(client_key, command)
    assert result.returncode == 1
    assert result.stdout == b""
    assert len(result.stderr.decode().splitlines()) == 1 and message in result.stderr.decode()
    via_asyncssh = agent.asyncssh_run(client_key, command)
    assert via_asyncssh.exit_status == 1 and message in via_asyncssh.stderr


def test_non_utf8_command_gets_a_clear_error_and_server_keeps_serving(agent, client_key):
    result = agent.ssh(client_key, b"get\xff\xfe")
    assert result.returncode == 1
    assert result.stderr.decode() == "command is not valid UTF-8\n"
    # Not UTF-8, so not a loggable verb: neither the bytes nor their escapes reach the log.
    agent.wait_for(r'poll .*command="\(unprintable verb\)\.\.\.\(\+5 chars not logged\)" status=1')
    assert agent.ssh(client_key, "get").returncode == 0


def test_overlong_command_gets_a_clear_error_and_server_keeps_serving(agent, client_key):
    result = agent.ssh(client_key, "get" + "x" * 20000)
    assert result.returncode == 1
    assert "command too long (20003 characters" in result.stderr.decode()
    assert agent.ssh(client_key, "get").returncode == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_bad_snapshot_exit_3_then_recovers(agent, client_key, snapshot, damage):
    good = encode(snapshot)
    bad = {"garbage": os.urandom(len(good)), "truncated": good[:40], "empty": b""}[damage]
    agent.device_path.write_bytes(bad)
    result = agent.ssh(client_key, "get")
    assert result.returncode == 3
    assert result.stderr.decode().startswith(f"bad snapshot from {agent.device_path}: ")
    assert agent.asyncssh_run(client_key, "get json").exit_status == 3
    agent.device_path.write_bytes(good)
    assert agent.ssh(client_key, "get-tcp-secrets").stdout.decode() == legacy_text(snapshot)


def test_device_vanishing_mid_run_exit_2_then_serves_again(agent, client_key, snapshot):
    assert agent.ssh(client_key, "get").returncode == 0
    parked = agent.device_path.with_name("parked")
    agent.device_path.rename(parked)
    for command in ("get", "get json", "get-tcp-secrets"):
        result = agent.ssh(client_key, command)
        assert (result.returncode, result.stderr) == (2, b"tcpsecrets module not loaded\n")
    parked.rename(agent.device_path)
    result = agent.ssh(client_key, "get json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["net_secret"] == snapshot.net_secret.hex()


def test_each_answer_reads_the_device_afresh(agent, client_key, snapshot):
    changed = snapshot.__class__(**{**snapshot.__dict__, "net_secret": bytes(range(16))})
    agent.device_path.write_bytes(encode(changed))
    assert json.loads(agent.ssh(client_key, "get json").stdout)["net_secret"] == bytes(range(16)).hex()


def test_every_poll_is_logged_and_no_secret_ever_is(agent, client_key, snapshot):
    start = agent.mark()
    # `set` carries secrets as arguments (anycast mode): they must not be logged either
    anycast = ";".join(["set", snapshot.net_secret.hex(), snapshot.syncookie_secret.hex(),
                        snapshot.syncookie6_secret.hex(), snapshot.ts_secret.hex(), "2", "1", "1", "1"])
    # Mistyped: the issue's `set,<net_secret>...` (the separator typed
    # wrong) and a secret sent as the command itself; only verbs matching
    # ^[a-z-]{1,16}$ are logged, so neither shows any of it.
    mistyped = anycast.replace(";", ",")
    bare = snapshot.net_secret.hex()
    for command in ("get", "get json", "get-tcp-secrets", "nonsense", anycast, mistyped, bare):
        agent.ssh(client_key, command)
    agent.asyncssh_run(client_key, "get json", host="::1")
    polls = agent.wait_for_all(r"poll src=(\S+) user=mitigator_agent instance=mitigator1 "
                               r"key=SHA256:\S+ command=(.+) status=(\d) result=.* duration_ms=[\d.]+$",
                               8, start)
    assert [match.group(3) for match in polls] == ["0", "0", "0", "1", "1", "1", "1", "0"]
    assert [match.group(2) for match in polls[3:7]] == [
        "nonsense", f'"set...(+{len(anycast) - 3} chars not logged)"',
        f'"(unprintable verb)...(+{len(mistyped)} chars not logged)"',
        '"(unprintable verb)...(+32 chars not logged)"']
    assert polls[7].group(1).startswith("[::1]:")
    log = agent.log
    for secret in (snapshot.syncookie_secret, snapshot.syncookie6_secret, snapshot.net_secret, snapshot.ts_secret):
        for piece in (secret.hex(), secret[:8].hex(), secret[8:].hex(), secret.hex().upper()):
            assert piece not in log


def test_emulated_mitigators_read_the_answers_they_get_over_openssh(agent, client_key, snapshot):
    current = MitigatorV2308.from_get(agent.ssh(client_key, "get").stdout.decode())
    client, server = ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("198.51.100.1")
    assert current.cookie(client, server, 40000, 443, 99, 1460, snapshot.realtime_ns) == cookies.make_cookie(
        snapshot, client, server, 40000, 443, 99, 1460)
    legacy = LegacyConsumer.from_text(agent.ssh(client_key, "get-tcp-secrets").stdout.decode(), hz=snapshot.hz)
    assert legacy.count(snapshot.realtime_ns) == snapshot.cookie_count
    assert legacy.cookie(client, server, 40000, 443, 99, 1460, snapshot.realtime_ns) == cookies.make_cookie(
        snapshot, client, server, 40000, 443, 99, 1460)
