"""Fuzzing what a client's command and the module's bytes go through.

- The SSH command (untrusted: any authenticated key sends any bytes):
  ``respond`` answers every command with status 0 and the right answer or
  with status 1 and one line on stderr, never raises; what the log shows
  of it is a known command or a bare verb, never its arguments.
- ``set;...`` (parse_set_command): SetValues or SetUsageError, whose
  message never repeats an argument; valid values round-trip through the
  command text and through the kernel struct (encode_set/decode_set).
- The snapshot (decode): a Snapshot or SnapshotError for any bytes; what
  decodes re-encodes to itself and renders (get, get json, legacy text)
  without error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import safe_dir  # noqa: F401  (fixture; also loads the profile)
from mitigator_agent import __version__
from mitigator_agent.answers import (
    EXIT_OK,
    EXIT_USAGE,
    HostFacts,
    get_text,
    json_answer,
    legacy_text,
    loggable_command,
    respond,
    validate_json_answer,
)
from mitigator_agent.anycast import SET_NUMBERS, SET_SECRETS, SET_USAGE, SetUsageError, parse_set_command
from mitigator_agent.snapshot import (
    ABI1_SIZE,
    ABI1_VERSION,
    F_WALL_CLOCK,
    STRUCT_SIZE,
    SET_RANGES,
    SetValues,
    Snapshot,
    SnapshotError,
    _ffi,
    decode,
    decode_set,
    encode,
    encode_set,
)

FACTS = HostFacts("Linux", "6.1.0-56-amd64", __version__, True)
KNOWN = ["get", "get json", "get-tcp-secrets", "set", "get  json", " get ", "GET", "get;", "set;", "get json x"]
COMMAND_CHAR = st.one_of(st.characters(), st.sampled_from(list(";, \t\n\r\x00\udcff0123456789abcdef-")))
HEX = st.text(st.sampled_from("0123456789abcdefABCDEF"), min_size=0, max_size=70)
SET_ARGUMENT = st.one_of(HEX, st.integers(-3, 300).map(str), st.text(COMMAND_CHAR, max_size=8))


def hex_of(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


SET_VALUES = st.builds(
    SetValues,
    net_secret=hex_of(16), syncookie_secret=hex_of(32), syncookie6_secret=hex_of(32), ts_secret=hex_of(16),
    **{name: st.integers(*SET_RANGES[name]) for _, name in SET_NUMBERS},
)


def set_command(values: SetValues) -> str:
    return ";".join(["set"] + [getattr(values, name).hex() for _, name, _ in SET_SECRETS]
                    + [str(getattr(values, name)) for _, name in SET_NUMBERS])


COMMAND = st.one_of(
    st.text(COMMAND_CHAR, max_size=300),
    st.builds(lambda head, known, tail: head + known + tail, st.sampled_from(["", " ", "\t"]),
              st.sampled_from(KNOWN), st.text(COMMAND_CHAR, max_size=6)),
    st.builds(lambda args: ";".join(["set"] + args), st.lists(SET_ARGUMENT, max_size=10)),
    SET_VALUES.map(set_command),
    st.none(),
)
_USAGE = re.escape(f"(usage: {SET_USAGE})")
_SECRET_NAMES = "|".join(name for name, _, _ in SET_SECRETS)
_NUMBER_NAMES = "|".join(name for name, _ in SET_NUMBERS)
SET_USAGE_MESSAGE = re.compile(
    rf"not a set command {_USAGE}"
    rf"|set takes 8 arguments \(7 without SYNCOOKIE6, as before 26\.04\), got \d+ {_USAGE}"
    rf"|set: (?:{_SECRET_NAMES}) must be (?:32|64) hex digits(?:, got \d+ characters| \(0-9, a-f, A-F\))"
    rf"|set: (?:{_NUMBER_NAMES}) must be a decimal number \d+\.\.\d+")
LOGGED = re.compile(r"\(none\)|\(empty\)|(?:[a-z-]{1,16}|\(unprintable verb\))(?:\.\.\.\(\+\d+ chars not logged\))?")


INT_RANGES = {"uint16_t": (0, 2**16 - 1), "uint32_t": (0, 2**32 - 1), "uint64_t": (0, 2**64 - 1),
              "int32_t": (-2**31, 2**31 - 1)}


def field_values(name: str) -> st.SearchStrategy[int]:
    """Every value the struct field ``name`` can hold (its C type, from the agent's own cffi layout)."""
    cname = dict(_ffi.typeof("struct tcpsecrets_snapshot").fields)[name].type.cname
    return st.integers(*INT_RANGES[cname])


def snapshot_strategy() -> st.SearchStrategy[Snapshot]:
    """Valid snapshots of either ABI: every field over its whole C range (hz never 0)."""
    def build(abi: int, flags: int, hz: int, numbers, secrets, newer) -> Snapshot:
        if abi == ABI1_VERSION:
            flags &= ~F_WALL_CLOCK
            newer = {}
        return Snapshot(abi_version=abi, size=STRUCT_SIZE if abi != ABI1_VERSION else ABI1_SIZE, flags=flags,
                        hz=hz, syncookie_secret=secrets[0], syncookie6_secret=secrets[1], net_secret=secrets[2],
                        ts_secret=secrets[3], **numbers, **newer)
    numbers = ("realtime_ns", "tcp_clock_ms", "jiffies64", "tcp_syncookies", "tcp_timestamps", "tcp_sack",
               "tcp_window_scaling", "tcp_ecn")
    newer = ("cookie_count", "ts_shift_ms", "set_generation", "sendsyn_dropped", "netns_inum", "netns_refusing",
             "cookies_refused")
    return st.builds(
        build,
        st.sampled_from([2, ABI1_VERSION]), field_values("flags"), field_values("hz").filter(bool),
        st.fixed_dictionaries({name: field_values(name) for name in numbers}),
        st.tuples(hex_of(32), hex_of(32), hex_of(16), hex_of(16)),
        st.fixed_dictionaries({name: field_values(name) for name in newer}),
    )


SNAPSHOTS = snapshot_strategy()


@pytest.fixture(scope="module")
def device(safe_dir: Path) -> str:
    return str(safe_dir / "snapshot")


@given(COMMAND, SNAPSHOTS)
def test_every_command_gets_its_answer_or_one_usage_line(device, command, snap):
    Path(device).write_bytes(encode(snap))
    answer = respond(command, device, lambda: FACTS, None, "mitigator1")
    event(f"status {answer.exit_status}")
    stripped = command.strip() if command is not None else None
    if answer.exit_status == EXIT_OK:
        assert answer.stderr == ""
        if stripped in (None, "get-tcp-secrets"):
            assert answer.stdout == legacy_text(snap)
        elif stripped == "get":
            assert answer.stdout == get_text(snap, FACTS)
        else:
            assert " ".join(stripped.split()) == "get json"
            assert json.loads(answer.stdout) == json_answer(snap, FACTS)
    else:
        assert answer.exit_status == EXIT_USAGE, answer
        assert answer.stdout == "" and answer.stderr.endswith("\n") and answer.stderr.count("\n") == 1


@given(COMMAND)
def test_the_log_shows_a_known_command_or_a_bare_verb_never_arguments(command):
    logged = loggable_command(command)
    stripped = command.strip() if command is not None else ""
    if logged in ("get", "get-tcp-secrets") or logged.startswith("get "):
        assert logged == stripped
        return
    assert LOGGED.fullmatch(logged), logged
    verb = logged.split("...", 1)[0]
    if verb not in ("(none)", "(empty)", "(unprintable verb)"):
        rest = stripped[len(verb):]
        assert stripped.startswith(verb) and (rest == "" or re.match(r"[;\s]", rest))


@given(COMMAND)
def test_set_parses_or_names_the_broken_rule_without_repeating_a_value(command):
    command = command or ""
    try:
        request = parse_set_command(command)
    except SetUsageError as exc:
        # One of the rules' own sentences: nothing of the command but a count or a length.
        assert SET_USAGE_MESSAGE.fullmatch(str(exc)), str(exc)
        return
    event("set parsed" + (" (7 values)" if request.keeps_syncookie6 else ""))
    values = request.completed(bytes(32))
    assert values.problems() == []
    assert decode_set(encode_set(values)) == values


@given(SET_VALUES)
def test_set_values_round_trip_through_the_command_and_the_struct(values):
    assert parse_set_command(set_command(values)).values == values
    assert decode_set(encode_set(values)) == values
    # The layout before 26.04: the same values but the IPv6 key, which the module keeps.
    parts = set_command(values).split(";")
    before = parse_set_command(";".join(parts[:3] + parts[4:]))
    assert before.keeps_syncookie6 and before.completed(values.syncookie6_secret) == values


@given(st.binary(max_size=300))
def test_set_struct_decodes_or_is_refused_with_value_error(data):
    try:
        values = decode_set(data)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert encode_set(values) == data


MUTATION = st.lists(st.tuples(st.integers(0, STRUCT_SIZE + 8), st.integers(0, 255)), max_size=6)


@given(st.one_of(
    st.binary(max_size=2 * STRUCT_SIZE),
    st.builds(lambda snap, mutations, cut: mutate(encode(snap), mutations, cut), SNAPSHOTS, MUTATION,
              st.one_of(st.none(), st.integers(0, STRUCT_SIZE + 16))),
))
def test_snapshot_bytes_decode_or_are_refused_and_what_decodes_round_trips(data):
    try:
        snap = decode(data)
    except SnapshotError as exc:
        event("refused")
        assert str(exc) and "\n" not in str(exc)
        return
    event("decoded")
    assert decode(encode(snap)) == dataclasses.replace(
        snap, size=ABI1_SIZE if snap.abi_version == ABI1_VERSION else STRUCT_SIZE)
    legacy_text(snap)
    get_text(snap, FACTS)
    assert validate_json_answer(json.loads(json.dumps(json_answer(snap, FACTS)))) == []


def mutate(data: bytes, mutations, cut) -> bytes:
    buffer = bytearray(data + bytes(8))
    for offset, value in mutations:
        if offset < len(buffer):
            buffer[offset] = value
    return bytes(buffer[:len(data) if cut is None else cut])


@given(SNAPSHOTS)
def test_snapshots_round_trip_through_the_struct(snap):
    assert decode(encode(snap)) == snap
