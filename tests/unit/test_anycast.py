"""Anycast `set`: validation, apply-then-store, replay into a reloaded module, fail closed.

The kernel is played by FakeKernel: a snapshot file that a write of a set
rewrites the way the module would (new secrets and sysctls, set_generation
+ 1).  Real OpenSSH clients and the real console script: tests/integration.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from pathlib import Path
from typing import List, Optional

import pytest

from mitigator_agent.answers import EXIT_ANYCAST, EXIT_NO_DEVICE, EXIT_OK, EXIT_USAGE, respond
from mitigator_agent.anycast import Anycast, SetRequest, SetUsageError, parse_set_command
from mitigator_agent.snapshot import (
    SetRejected,
    SetValues,
    Snapshot,
    decode,
    decode_set,
    encode,
    encode_set,
)
from test_answers import FACTS, SNAP

NET, SYN, SYN6, TS = "11" * 16, "22" * 32, "33" * 32, "44" * 16
GOOD = f"set;{NET};{SYN};{SYN6};{TS};1;0;2;1"
GOOD_VALUES = SetValues(bytes([0x11] * 16), bytes([0x22] * 32), bytes([0x33] * 32), bytes([0x44] * 16),
                        tcp_ecn=1, tcp_sack=0, tcp_timestamps=2, tcp_window_scaling=1)
SECRET_TEXTS = [NET, SYN, SYN6, TS]


class FakeKernel:
    """A snapshot file plus the module's reaction to a set written to it."""

    def __init__(self, path: Path, snap: Snapshot, refuse: Optional[Exception] = None,
                 apply: bool = True) -> None:
        self.path = path
        self.writes: List[SetValues] = []
        self.refuse = refuse
        self.apply = apply
        path.write_bytes(encode(snap))

    def write(self, device: str, values: SetValues) -> None:
        assert device == str(self.path)
        if self.refuse is not None:
            raise self.refuse
        self.writes.append(values)
        if not self.apply:
            return
        current = decode(self.path.read_bytes())
        self.path.write_bytes(encode(dataclasses.replace(
            current, set_generation=current.set_generation + 1,
            **{item.name: getattr(values, item.name) for item in dataclasses.fields(values)})))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)  # strict modes for the state directory
    return tmp_path / "state"


def make(tmp_path: Path, state: Path, instances=("mitigator1",), snap: Snapshot = SNAP,
         **kernel_options: object) -> tuple[Anycast, FakeKernel]:
    kernel = FakeKernel(tmp_path / "device", dataclasses.replace(snap, set_generation=0), **kernel_options)
    return Anycast(instances, str(state), str(kernel.path), writer=kernel.write), kernel


def store(state: Path, data: bytes, mode: int = 0o600) -> Path:
    state.mkdir(mode=0o700, exist_ok=True)
    path = state / "anycast-set"
    path.write_bytes(data)
    path.chmod(mode)
    return path


# --- parsing ---------------------------------------------------------------

def test_parse_accepts_lower_and_upper_case_hex():
    assert parse_set_command(GOOD) == SetRequest(GOOD_VALUES)
    assert parse_set_command(GOOD.upper().replace("SET;", "set;")) == SetRequest(GOOD_VALUES)
    mixed = f"set;{'aB' * 16};{SYN};{SYN6};{TS};0;1;0;0"
    assert parse_set_command(mixed).values.net_secret == bytes([0xAB] * 16)


def test_the_7_value_layout_before_26_04_keeps_the_ipv6_key():
    """MITIGATOR with isn_sync v23.08 to v25.06 sends no SYNCOOKIE6: the module's own one stays."""
    request = parse_set_command(f"set;{NET};{SYN};{TS};1;0;2;1")
    assert request.keeps_syncookie6
    kept = bytes(range(32))
    assert request.completed(kept) == dataclasses.replace(GOOD_VALUES, syncookie6_secret=kept)
    assert parse_set_command(GOOD).completed(kept) == GOOD_VALUES  # 8 values: the command's own key


COUNT = "set takes 8 arguments (7 without SYNCOOKIE6, as before 26.04), got"


@pytest.mark.parametrize("command, message", [
    (f"set;{NET};{SYN};{SYN6};{TS};1;0", f"{COUNT} 6"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;0;2", "TS must be 32 hex digits, got 64 characters"),  # read as 7
    (GOOD + ";1", f"{COUNT} 9"),
    ("set", f"{COUNT} 0"),
    (GOOD.replace(NET, NET[:-1]), "NET must be 32 hex digits, got 31 characters"),
    (GOOD.replace(NET, NET + "1"), "NET must be 32 hex digits, got 33 characters"),
    (GOOD.replace(SYN, SYN[:-2]), "SYNCOOKIE must be 64 hex digits, got 62 characters"),
    (GOOD.replace(SYN6, "g" + SYN6[1:]), "SYNCOOKIE6 must be 64 hex digits (0-9, a-f, A-F)"),
    (GOOD.replace(TS, "44 " + TS[3:]), "TS must be 32 hex digits (0-9, a-f, A-F)"),
    (GOOD.replace(TS, "0x" + TS[2:]), "TS must be 32 hex digits (0-9, a-f, A-F)"),
    (f"set;{NET};{SYN};{SYN6};{TS};3;0;2;1", "ECN must be a decimal number 0..2"),
    (f"set;{NET};{SYN};{SYN6};{TS};-1;0;2;1", "ECN must be a decimal number 0..2"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;2;2;1", "SACK must be a decimal number 0..1"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;0;3;1", "TIMESTAMPS must be a decimal number 0..2"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;0;2;2", "WSCALE must be a decimal number 0..1"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;0;2;", "WSCALE must be a decimal number 0..1"),
    (f"set;{NET};{SYN};{SYN6};{TS};1;0; 2;1", "TIMESTAMPS must be a decimal number 0..2"),
    (f"set;{NET};{SYN};{SYN6};{TS};1.0;0;2;1", "ECN must be a decimal number 0..2"),
    (f"set;{NET};{SYN};{SYN6};{TS};\u0661;0;2;1", "ECN must be a decimal number 0..2"),  # Arabic one
    (f"set;{NET};{SYN};{SYN6};{TS};0x1;0;2;1", "ECN must be a decimal number 0..2"),
])
def test_parse_refuses_each_rule_without_echoing_values(command, message):
    with pytest.raises(SetUsageError, match=re.escape(message)) as caught:
        parse_set_command(command)
    for secret in SECRET_TEXTS:
        assert secret[:8] not in str(caught.value)


# --- the set command ---------------------------------------------------------

def test_set_disabled_without_instances(tmp_path, state):
    agent, kernel = make(tmp_path, state, instances=())
    before = kernel.path.read_bytes()
    for anycast in (agent, None):
        answer = respond(GOOD, str(kernel.path), lambda: FACTS, anycast, "mitigator1")
        assert (answer.stdout, answer.stderr, answer.exit_status) == (
            "", "anycast set is not enabled on this agent\n", EXIT_USAGE)
    assert kernel.writes == [] and kernel.path.read_bytes() == before and not state.exists()


@pytest.mark.parametrize("instance", ["mitigator2", "", None, "Mitigator1", "mitigator1 "])
def test_set_refused_for_other_instances(tmp_path, state, instance):
    agent, kernel = make(tmp_path, state)
    answer = respond(GOOD, str(kernel.path), lambda: FACTS, agent, instance)
    assert answer.exit_status == EXIT_USAGE and answer.stdout == ""
    assert answer.stderr.startswith("anycast set is not allowed for this key (instance ")
    assert kernel.writes == [] and not state.exists()


def test_malformed_set_writes_and_stores_nothing(tmp_path, state):
    agent, kernel = make(tmp_path, state)
    before = kernel.path.read_bytes()
    answer = respond(GOOD.replace(";2;1", ";3;1"), str(kernel.path), lambda: FACTS, agent, "mitigator1")
    assert (answer.stderr, answer.exit_status) == ("set: TIMESTAMPS must be a decimal number 0..2\n", EXIT_USAGE)
    assert kernel.writes == [] and kernel.path.read_bytes() == before and not state.exists()


def test_set_applied_then_stored_0600_and_answered(tmp_path, state):
    agent, kernel = make(tmp_path, state, instances=("mitigator1", "mitigator3"))
    answer = respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator3")
    assert (answer.stdout, answer.stderr, answer.exit_status) == ("ok\n", "", EXIT_OK)
    assert kernel.writes == [GOOD_VALUES]
    stored = state / "anycast-set"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    assert decode_set(stored.read_bytes()) == GOOD_VALUES and os.listdir(state) == ["anycast-set"]
    got = respond("get", str(kernel.path), lambda: FACTS, agent, "mitigator1").stdout
    assert f"net_secret: {NET}\n" in got and "tcp_timestamps: 2\n" in got
    assert kernel.writes == [GOOD_VALUES]  # generation 1: nothing to replay


def test_a_7_value_set_keeps_the_modules_ipv6_key_and_stores_all_8(tmp_path, state):
    """The layout of MITIGATOR before 26.04: the module's IPv6 key is written back unchanged, so the
    stored set (replayed after a reload) holds what the kernel had."""
    agent, kernel = make(tmp_path, state)
    answer = respond(f"set;{NET};{SYN};{TS};1;0;2;1", str(kernel.path), lambda: FACTS, agent, "mitigator1")
    assert (answer.stdout, answer.stderr, answer.exit_status) == ("ok\n", "", EXIT_OK)
    expected = dataclasses.replace(GOOD_VALUES, syncookie6_secret=SNAP.syncookie6_secret)
    assert kernel.writes == [expected]
    assert decode_set((state / "anycast-set").read_bytes()) == expected
    got = respond("get", str(kernel.path), lambda: FACTS, agent, "mitigator1").stdout
    assert f"syncookie6_secret: {SNAP.syncookie6_secret.hex()}\n" in got and f"net_secret: {NET}\n" in got


def test_refused_by_the_module_stores_nothing(tmp_path, state):
    agent, kernel = make(tmp_path, state, refuse=SetRejected("rejected by the module (x: invalid argument)"))
    answer = respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator1")
    assert answer.exit_status == EXIT_ANYCAST
    assert answer.stderr == "anycast set failed: rejected by the module (x: invalid argument)\n"
    assert not state.exists()


def test_set_without_the_module(tmp_path, state):
    agent = Anycast(("mitigator1",), str(state), str(tmp_path / "absent"))  # the real write_set
    answer = respond(GOOD, str(tmp_path / "absent"), lambda: FACTS, agent, "mitigator1")
    assert (answer.stderr, answer.exit_status) == ("tcpsecrets module not loaded\n", EXIT_NO_DEVICE)
    assert not state.exists()


def test_applied_but_not_storable_is_an_error(tmp_path):
    agent, kernel = make(tmp_path, tmp_path / "no" / "such" / "state")
    answer = respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator1")
    assert answer.exit_status == EXIT_ANYCAST
    assert answer.stderr.startswith("anycast set failed: applied, but could not be stored in ")
    assert "will not survive a module reload" in answer.stderr and kernel.writes == [GOOD_VALUES]


def test_store_is_atomic_a_failed_rename_keeps_the_old_set(tmp_path, state, monkeypatch):
    old = store(state, encode_set(dataclasses.replace(GOOD_VALUES, tcp_ecn=0)))
    agent, kernel = make(tmp_path, state)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)  # the rename at the end of atomic.py
    answer = respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator1")
    assert answer.exit_status == EXIT_ANYCAST and "No space left on device" in answer.stderr
    assert decode_set(old.read_bytes()).tcp_ecn == 0 and os.listdir(state) == ["anycast-set"]


# --- replay and fail closed -------------------------------------------------------

@pytest.mark.parametrize("command", [None, "get", "get json", "get-tcp-secrets"])
def test_stored_set_replayed_before_answering_a_reloaded_module(tmp_path, state, caplog, command):
    store(state, encode_set(GOOD_VALUES))
    agent, kernel = make(tmp_path, state)
    with caplog.at_level(logging.INFO):
        answer = respond(command, str(kernel.path), lambda: FACTS, agent, "mitigator2")
    assert answer.exit_status == EXIT_OK and kernel.writes == [GOOD_VALUES]
    assert NET in answer.stdout  # answered from the snapshot taken after the replay
    assert [r.getMessage().split()[0] for r in caplog.records] == ["anycast-set-replayed"]
    assert "when=poll" in caplog.text
    respond(command, str(kernel.path), lambda: FACTS, agent, "mitigator2")
    assert len(kernel.writes) == 1  # generation 1 now: no second replay


def test_no_replay_when_the_module_has_a_set_or_anycast_is_off(tmp_path, state):
    store(state, encode_set(GOOD_VALUES))
    agent, kernel = make(tmp_path, state)
    kernel.path.write_bytes(encode(dataclasses.replace(SNAP, set_generation=4)))
    assert respond("get", str(kernel.path), lambda: FACTS, agent).exit_status == EXIT_OK
    off, kernel = make(tmp_path, state, instances=())
    assert respond("get", str(kernel.path), lambda: FACTS, off).exit_status == EXIT_OK
    assert kernel.writes == []


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(b"\x00" * 120), "not a valid set (bad set magic)"),
    (lambda path: path.write_bytes(encode_set(GOOD_VALUES)[:-1]), "not a valid set (a set is 120 bytes, not 119)"),
    (lambda path: path.chmod(0o622), "is writable by group or others (mode 0622)"),
    (lambda path: (path.unlink(), path.symlink_to(path.with_name("elsewhere"))), "it is a symbolic link"),
    (lambda path: (path.unlink(), path.mkdir()), "is not a regular file"),
])
def test_unusable_stored_set_fails_closed_until_a_new_set(tmp_path, state, damage, reason):
    path = store(state, encode_set(GOOD_VALUES))
    damage(path)
    agent, kernel = make(tmp_path, state)
    for command in (None, "get", "get json"):
        answer = respond(command, str(kernel.path), lambda: FACTS, agent, "mitigator1")
        assert answer.exit_status == EXIT_ANYCAST and answer.stdout == ""
        assert answer.stderr.startswith(f"stored anycast set {path} is unusable: ") and reason in answer.stderr
    assert kernel.writes == []
    if path.is_dir():
        path.rmdir()
    elif path.is_symlink():
        path.unlink()
    assert respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator1").exit_status == EXIT_OK
    assert respond("get", str(kernel.path), lambda: FACTS, agent, "mitigator1").exit_status == EXIT_OK


def test_replay_refused_or_not_taking_effect_fails_closed(tmp_path, state):
    store(state, encode_set(GOOD_VALUES))
    agent, kernel = make(tmp_path, state, refuse=SetRejected("rejected by the module"))
    answer = respond("get", str(kernel.path), lambda: FACTS, agent)
    assert (answer.exit_status, answer.stderr) == (
        EXIT_ANYCAST, "replaying the stored anycast set failed: rejected by the module\n")
    agent, kernel = make(tmp_path, state, apply=False)
    answer = respond("get", str(kernel.path), lambda: FACTS, agent)
    assert (answer.exit_status, answer.stderr) == (
        EXIT_ANYCAST, "the tcpsecrets module reports no anycast set applied after the replay\n")


def test_an_abi1_module_cannot_take_the_stored_set(tmp_path, state):
    store(state, encode_set(GOOD_VALUES))
    old = dataclasses.replace(SNAP, abi_version=1, size=160, flags=SNAP.flags & ~0x20000, cookie_clock=0,
                              cookie_count=-1, ts_shift_ms=0, set_generation=0, sendsyn_dropped=0)
    agent, kernel = make(tmp_path, state, snap=old)
    answer = respond("get", str(kernel.path), lambda: FACTS, agent)
    assert answer.exit_status == EXIT_ANYCAST and "(ABI 1) cannot apply" in answer.stderr


# --- start-up --------------------------------------------------------------------

def events(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [record.getMessage() for record in caplog.records]


def test_startup_replays_and_says_so(tmp_path, state, caplog):
    store(state, encode_set(GOOD_VALUES))
    agent, kernel = make(tmp_path, state, instances=("b", "a"))
    with caplog.at_level(logging.INFO):
        agent.startup()
    assert kernel.writes == [GOOD_VALUES]
    assert events(caplog)[0] == f'anycast-enabled instances="a,b" store={state / "anycast-set"}'
    assert events(caplog)[1].startswith("anycast-set-replayed when=start ")


def test_startup_without_device_defers(tmp_path, state, caplog):
    store(state, encode_set(GOOD_VALUES))
    agent = Anycast(("a",), str(state), str(tmp_path / "absent"))
    with caplog.at_level(logging.INFO):
        agent.startup()
    assert events(caplog)[1] == 'anycast-replay-deferred reason="tcpsecrets module not loaded"'


def test_startup_reports_an_unusable_store(tmp_path, state, caplog):
    store(state, b"junk")
    agent, kernel = make(tmp_path, state)
    with caplog.at_level(logging.INFO):
        agent.startup()
    assert events(caplog)[1].startswith("anycast-unavailable reason=") and kernel.writes == []
    assert caplog.records[1].levelno == logging.ERROR


def test_startup_with_anycast_off_ignores_a_stored_set(tmp_path, state, caplog):
    store(state, encode_set(GOOD_VALUES))
    agent, kernel = make(tmp_path, state, instances=())
    with caplog.at_level(logging.INFO):
        agent.startup()
    assert kernel.writes == [] and events(caplog) == [
        f'anycast-set-ignored store={state / "anycast-set"} reason="anycast disabled'
        ' (no anycast-instance configured)"']


def test_nothing_anycast_does_logs_or_answers_a_value(tmp_path, state, caplog):
    agent, kernel = make(tmp_path, state)
    with caplog.at_level(logging.DEBUG):
        results = [respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator1")]
        kernel.path.write_bytes(encode(dataclasses.replace(SNAP, set_generation=0)))
        results.append(respond("get", str(kernel.path), lambda: FACTS, agent, "mitigator1"))  # replays
        agent.startup()
        results.append(respond(GOOD.replace(";1;0;2;1", ";1;0;2;7"), str(kernel.path), lambda: FACTS, agent,
                               "mitigator1"))
        results.append(respond(GOOD, str(kernel.path), lambda: FACTS, agent, "mitigator2"))
    assert len(kernel.writes) == 2 and "anycast-set-replayed" in caplog.text
    logged = caplog.text + "".join(answer.result + answer.stderr for answer in results)
    for secret in SECRET_TEXTS:
        for piece in (secret, secret[:16], secret.upper()[:16]):
            assert piece not in logged
