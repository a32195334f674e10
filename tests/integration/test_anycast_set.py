"""`set;...` over real OpenSSH against the real agent: refusals, apply + store, replay at start.

The snapshot file stands in for /dev/tcpsecrets: write_set just writes the
set's 120 bytes at its start, so a test reads them back, then writes the
snapshot the module would show afterwards (its secrets, set_generation 1).
Poll-time replay against a module that reacts is in tests/unit/test_anycast.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from mitigator_agent.snapshot import SetValues, Snapshot, decode_set, encode, encode_set

from conftest import AGENT, WAIT_SECONDS, AgentProcess, ClientKey


def random_values() -> SetValues:
    return SetValues(net_secret=os.urandom(16), syncookie_secret=os.urandom(32),
                     syncookie6_secret=os.urandom(32), ts_secret=os.urandom(16),
                     tcp_ecn=1, tcp_sack=1, tcp_timestamps=2, tcp_window_scaling=0)


def set_command(values: SetValues, upper: bool = False) -> str:
    secrets = [values.net_secret.hex(), values.syncookie_secret.hex(), values.syncookie6_secret.hex(),
               values.ts_secret.hex()]
    if upper:
        secrets = [text.upper() for text in secrets]
    numbers = [values.tcp_ecn, values.tcp_sack, values.tcp_timestamps, values.tcp_window_scaling]
    return ";".join(["set", *secrets, *map(str, numbers)])


def after_set(snapshot: Snapshot, values: SetValues, generation: int = 1) -> Snapshot:
    """The snapshot the module shows once ``values`` are applied."""
    return dataclasses.replace(snapshot, set_generation=generation,
                               **{item.name: getattr(values, item.name) for item in dataclasses.fields(values)})


@pytest.fixture
def state_dir(workdir: Path) -> Path:
    return workdir / "state"


@pytest.fixture
def both_keys(client_key: ClientKey, second_key: ClientKey) -> str:
    return client_key.public_line + "\n" + second_key.public_line + "\n"


@pytest.fixture
def anycast_agent(start_agent: Callable[..., AgentProcess], both_keys: str, state_dir: Path) -> AgentProcess:
    """mitigator1 may `set`, mitigator2 may not."""
    return start_agent(both_keys, "--anycast-instance", "mitigator1", "--state-dir", str(state_dir))


def anycast_files(state_dir: Path) -> list:
    """What the state directory holds besides the known sources (knownsources.py), which every poll may write."""
    if not state_dir.exists():
        return []
    return sorted(name for name in os.listdir(state_dir) if not name.lstrip(".").startswith("known-sources.json"))


def assert_nothing_written(agent: AgentProcess, snapshot: Snapshot, state_dir: Path) -> None:
    assert agent.device_path.read_bytes() == encode(snapshot)
    assert anycast_files(state_dir) == []


def test_set_is_refused_when_anycast_is_disabled(start_agent, both_keys, client_key, snapshot, state_dir):
    agent = start_agent(both_keys, "--state-dir", str(state_dir))
    result = agent.ssh(client_key, set_command(random_values()))
    assert (result.returncode, result.stdout, result.stderr) == (
        1, b"", b"anycast set is not enabled on this agent\n")
    assert_nothing_written(agent, snapshot, state_dir)


def test_set_is_refused_for_an_instance_not_listed(anycast_agent, second_key, snapshot, state_dir):
    result = anycast_agent.ssh(second_key, set_command(random_values()))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr == b"anycast set is not allowed for this key (instance mitigator2)\n"
    assert_nothing_written(anycast_agent, snapshot, state_dir)
    anycast_agent.wait_for(r"poll .*instance=mitigator2 .*command=\"set\.\.\..* status=1"
                           r" result=\"anycast set not allowed for this instance\"")


def malformed(values: SetValues) -> list:
    good = set_command(values)
    parts = good.split(";")
    net, ts = parts[1], parts[4]
    usage = " (usage: set;NET;SYNCOOKIE;SYNCOOKIE6;TS;ECN;SACK;TIMESTAMPS;WSCALE)"
    return [
        (";".join(parts[:-2]), "set takes 8 arguments (7 without SYNCOOKIE6, as before 26.04), got 6" + usage),
        (good + ";0", "set takes 8 arguments (7 without SYNCOOKIE6, as before 26.04), got 9" + usage),
        (good.replace(net, net[:-1]), "set: NET must be 32 hex digits, got 31 characters"),
        (good.replace(parts[2], parts[2] + "0"), "set: SYNCOOKIE must be 64 hex digits, got 65 characters"),
        (good.replace(parts[3], "z" + parts[3][1:]), "set: SYNCOOKIE6 must be 64 hex digits (0-9, a-f, A-F)"),
        (good.replace(ts, "-" + ts[1:]), "set: TS must be 32 hex digits (0-9, a-f, A-F)"),
        (";".join(parts[:5] + ["3", "1", "2", "0"]), "set: ECN must be a decimal number 0..2"),
        (";".join(parts[:5] + ["1", "2", "2", "0"]), "set: SACK must be a decimal number 0..1"),
        (";".join(parts[:5] + ["1", "1", "3", "0"]), "set: TIMESTAMPS must be a decimal number 0..2"),
        (";".join(parts[:5] + ["1", "1", "2", "2"]), "set: WSCALE must be a decimal number 0..1"),
        (";".join(parts[:5] + ["1", "1", "x", "0"]), "set: TIMESTAMPS must be a decimal number 0..2"),
    ]


def test_malformed_sets_are_refused_one_rule_at_a_time(anycast_agent, client_key, snapshot, state_dir):
    values = random_values()
    for command, message in malformed(values):
        result = anycast_agent.ssh(client_key, command)
        assert (result.returncode, result.stdout, result.stderr.decode()) == (1, b"", message + "\n"), command
    assert_nothing_written(anycast_agent, snapshot, state_dir)
    log = anycast_agent.log
    for secret in (values.net_secret, values.syncookie_secret, values.syncookie6_secret, values.ts_secret):
        assert secret.hex()[:12] not in log and secret.hex()[-12:] not in log


@pytest.mark.parametrize("upper", [False, True], ids=["lowercase", "uppercase"])
def test_set_is_applied_then_stored_0600(anycast_agent, client_key, snapshot, state_dir, upper):
    values = random_values()
    start = anycast_agent.mark()
    result = anycast_agent.ssh(client_key, set_command(values, upper))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ok\n", b"")
    # the device got exactly one struct at its start
    assert decode_set(anycast_agent.device_path.read_bytes()[:120]) == values
    stored = state_dir / "anycast-set"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stored.read_bytes() == encode_set(values)
    assert anycast_files(state_dir) == ["anycast-set"]  # written atomically: no temporary left behind
    anycast_agent.wait_for(r'poll .*instance=mitigator1 .*command="set\.\.\.\(\+\d+ chars not logged\)"'
                           r' status=0 result="anycast set applied and stored"', start)
    # the module now shows the new secrets; `get` answers them
    anycast_agent.device_path.write_bytes(encode(after_set(snapshot, values)))
    got = anycast_agent.ssh(client_key, "get").stdout.decode()
    assert f"net_secret: {values.net_secret.hex()}\n" in got and "tcp_window_scaling: 0\n" in got
    log = anycast_agent.log
    for secret in (values.net_secret, values.syncookie_secret, values.syncookie6_secret, values.ts_secret):
        for piece in (secret.hex(), secret.hex().upper(), secret[:8].hex(), secret[8:].hex(),
                      secret[:8].hex().upper()):
            assert piece not in log


def test_a_second_set_replaces_the_stored_one(anycast_agent, client_key, snapshot, state_dir):
    first, second = random_values(), random_values()
    assert anycast_agent.ssh(client_key, set_command(first)).returncode == 0
    anycast_agent.device_path.write_bytes(encode(after_set(snapshot, first)))
    assert anycast_agent.ssh(client_key, set_command(second)).returncode == 0
    assert decode_set((state_dir / "anycast-set").read_bytes()) == second
    assert anycast_files(state_dir) == ["anycast-set"]


def stored_set(state_dir: Path, values: SetValues) -> Path:
    state_dir.mkdir(mode=0o700)
    path = state_dir / "anycast-set"
    path.write_bytes(encode_set(values))
    path.chmod(0o600)
    return path


def test_the_stored_set_is_replayed_at_start_before_listening(start_agent, both_keys, client_key, snapshot,
                                                             state_dir):
    values = random_values()
    stored_set(state_dir, values)
    agent = start_agent(both_keys, "--anycast-instance", "mitigator1", "--state-dir", str(state_dir))
    replayed = agent.wait_for(r"anycast-set-replayed when=start ")
    assert agent.device_path.read_bytes()[:120] == encode_set(values)
    lines = agent.lines
    assert lines.index(replayed.string) < next(i for i, line in enumerate(lines) if "listening on" in line)
    assert "reason=\"module reports no set applied (set_generation 0)\"" in replayed.string
    # the module took it (generation 1): polls answer its secrets without another replay
    agent.device_path.write_bytes(encode(after_set(snapshot, values)))
    start = agent.mark()
    got = agent.ssh(client_key, "get")
    assert got.returncode == 0 and f"ts_secret: {values.ts_secret.hex()}\n" in got.stdout.decode()
    agent.wait_for(r"poll .*command=get status=0", start)
    assert agent.count("anycast-set-replayed") == 1
    for secret in (values.net_secret, values.syncookie_secret, values.ts_secret):
        assert secret.hex()[:12] not in agent.log


def test_no_replay_when_anycast_is_disabled(start_agent, both_keys, client_key, snapshot, state_dir):
    stored_set(state_dir, random_values())
    agent = start_agent(both_keys, "--state-dir", str(state_dir))
    agent.wait_for(r"anycast-set-ignored .*reason=\"anycast disabled")
    assert agent.device_path.read_bytes() == encode(snapshot)
    assert agent.ssh(client_key, "get").returncode == 0


def test_an_unusable_stored_set_fails_closed_until_a_new_set(start_agent, both_keys, client_key, snapshot,
                                                            state_dir):
    stored = stored_set(state_dir, random_values())
    stored.write_bytes(b"not a set")
    agent = start_agent(both_keys, "--anycast-instance", "mitigator1", "--state-dir", str(state_dir))
    agent.wait_for(r"ERROR anycast-unavailable reason=\"stored anycast set .* is unusable")
    for command in ("get", "get json", "get-tcp-secrets"):
        result = agent.ssh(client_key, command)
        assert result.returncode == 5 and result.stdout == b""
        assert result.stderr.decode().startswith(f"stored anycast set {stored} is unusable: not a valid set")
    assert agent.device_path.read_bytes() == encode(snapshot)  # nothing replayed from a bad file
    values = random_values()
    assert agent.ssh(client_key, set_command(values)).returncode == 0  # a new set repairs it
    agent.device_path.write_bytes(encode(after_set(snapshot, values)))
    assert agent.ssh(client_key, "get").returncode == 0


def test_anycast_settings_from_the_config_file(start_agent, both_keys, second_key, snapshot, workdir):
    config = workdir / "agent.toml"
    config.write_text(f'anycast-instance = ["mitigator2"]\nstate-dir = "{workdir / "from-config"}"\n')
    config.chmod(0o644)
    agent = start_agent(both_keys, "--config", str(config))
    values = random_values()
    assert agent.ssh(second_key, set_command(values)).stdout == b"ok\n"
    assert decode_set((workdir / "from-config" / "anycast-set").read_bytes()) == values
    agent.wait_for(r'starting .*anycast=mitigator2')


def test_an_empty_instance_name_stops_the_agent(workdir):
    result = subprocess.run([AGENT, "serve", "--anycast-instance", "", "--port", "0"], capture_output=True,
                            text=True, timeout=WAIT_SECONDS, cwd=workdir)
    assert result.returncode == 2 and "an instance name must not be empty" in result.stderr


def test_a_7_value_set_from_a_mitigator_before_26_04_keeps_the_ipv6_key(anycast_agent, client_key, snapshot,
                                                                          state_dir):
    values = random_values()
    parts = set_command(values).split(";")
    result = anycast_agent.ssh(client_key, ";".join(parts[:3] + parts[4:]))  # no SYNCOOKIE6
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ok\n", b"")
    kept = dataclasses.replace(values, syncookie6_secret=snapshot.syncookie6_secret)
    assert decode_set(anycast_agent.device_path.read_bytes()[:120]) == kept
    assert (state_dir / "anycast-set").read_bytes() == encode_set(kept)


@pytest.mark.parametrize("level, lines", [("23.08", 8), ("24.10", 9), ("25.02", 9), ("25.06", 10), ("26.04", 11)])
def test_serve_protocol_answers_get_as_that_release_did(start_agent, client_key, level, lines, workdir):
    agent = start_agent(client_key.public_line + "\n", "--protocol", level)
    agent.wait_for(rf"starting .* protocol={re.escape(level)} ")
    answer = agent.ssh(client_key, "get").stdout.decode().splitlines()
    assert len(answer) == lines and answer[0] == "uname: Linux"
    assert ("version: " + level in answer) == (level != "23.08")
    assert any(line.startswith("syncookie6_secret: ") for line in answer) == (level == "26.04")


def test_serve_protocol_refuses_a_release_it_does_not_know(workdir):
    result = subprocess.run([AGENT, "serve", "--protocol", "22.02", "--port", "0"], capture_output=True, text=True,
                            timeout=WAIT_SECONDS, cwd=workdir)
    assert result.returncode == 2 and "'22.02' is not one of '23.08', '24.10', '25.02', '25.06', '26.04'" in result.stderr
