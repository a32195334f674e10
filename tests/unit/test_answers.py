"""Answer formats and command dispatch, against hand-written expected text."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mitigator_agent import answers
from mitigator_agent.answers import (
    EXIT_BAD_SNAPSHOT,
    EXIT_NO_DEVICE,
    EXIT_OK,
    EXIT_USAGE,
    HostFacts,
    get_text,
    json_answer,
    legacy_text,
    respond,
    validate_json_answer,
)
from mitigator_agent.snapshot import (
    ABI_VERSION,
    CLOCK_WALL,
    F_ALG_SEQ_AND_TS_OFF,
    F_ALG_TS_SECRET,
    F_COOKIE_ACCEPT,
    F_NET_SECRET,
    F_SENDSYN_DROP,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_OFFSET_HOOK,
    F_TS_SECRET,
    F_WALL_CLOCK,
    STRUCT_SIZE,
    Snapshot,
    encode,
)

FACTS = HostFacts(os_name="Linux", kernel_release="6.1.0-56-amd64", agent_version="1.2.3", clock_synced=True)

# The module's default on a 6.1.192+ kernel: wall cookie clock, its own
# ts_secret keying every TS offset (the kernel's own scheme is seq_and_ts_off).
SNAP = Snapshot(
    abi_version=ABI_VERSION,
    size=STRUCT_SIZE,
    flags=(F_SYNCOOKIE | F_SYNCOOKIE6 | F_NET_SECRET | F_TS_SECRET | F_ALG_SEQ_AND_TS_OFF | F_COOKIE_ACCEPT
           | F_WALL_CLOCK | F_TS_OFFSET_HOOK | F_SENDSYN_DROP),
    hz=250,
    realtime_ns=1_763_894_400_123_456_789,
    tcp_clock_ms=0x1_2345_6789,
    jiffies64=4_295_792_296,
    syncookie_secret=bytes(range(32)),
    syncookie6_secret=bytes(range(32, 64)),
    net_secret=bytes(range(0xA0, 0xB0)),
    ts_secret=bytes(range(0xC0, 0xD0)),
    tcp_syncookies=2,
    tcp_timestamps=1,
    tcp_sack=1,
    tcp_window_scaling=1,
    tcp_ecn=2,
    cookie_clock=CLOCK_WALL,
    cookie_count=1_763_894_400 // 60,
    # ((wall_ms - tcp_clock_ms + 5000) & ~63): (1763894400123 - 4886718345 + 5000) = 1759007686778,
    # minus its remainder 58 modulo 64, then mod 2^32
    ts_shift_ms=2_366_062_656,
    set_generation=3,
    sendsyn_dropped=17,
)

# The same kernel with the module loaded in jiffies mode: the stock clocks.
JIFFIES_SNAP = dataclasses.replace(SNAP, flags=SNAP.flags & ~F_WALL_CLOCK, cookie_clock=0,
                                   cookie_count=4_295_792_296 // (60 * 250), ts_shift_ms=0)

LEGACY = (
    "time_sec 1763894400\n"
    "time_ms 1763894400123\n"
    "uptime_ms 2957813705\n"  # (0x123456789 + ts_shift_ms) mod 2^32 = wall ms mod 2^32 + 4942
    "jiffies 440973600030\n"   # realtime_ns * 250 // 10**9: // (60*250) gives the wall minute
    "cookie_secret 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
    "net_secret a0a1a2a3a4a5a6a7a8a9aaabacadaeaf\n"
    "timestamp_secret c0c1c2c3c4c5c6c7c8c9cacbcccdcecf\n"
)

LEGACY_JIFFIES = (
    "time_sec 1763894400\n"
    "time_ms 1763894400123\n"
    "uptime_ms 591751049\n"  # 0x123456789 truncated to 32 bits
    "jiffies 4295792296\n"
    "cookie_secret 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
    "net_secret a0a1a2a3a4a5a6a7a8a9aaabacadaeaf\n"
    "timestamp_secret c0c1c2c3c4c5c6c7c8c9cacbcccdcecf\n"
)

GET = (
    "uname: Linux\n"
    "version: 26.04\n"
    "time: 1763894400\n"
    "net_secret: a0a1a2a3a4a5a6a7a8a9aaabacadaeaf\n"
    "syncookie_secret: 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
    "syncookie6_secret: 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\n"
    "ts_secret: c0c1c2c3c4c5c6c7c8c9cacbcccdcecf\n"
    "tcp_ecn: 2\n"
    "tcp_sack: 1\n"
    "tcp_timestamps: 1\n"
    "tcp_window_scaling: 1\n"
)


def test_legacy_text_byte_for_byte():
    assert legacy_text(SNAP) == LEGACY
    assert legacy_text(JIFFIES_SNAP) == LEGACY_JIFFIES


def test_legacy_text_of_an_abi1_module_without_ts_secret():
    old = dataclasses.replace(JIFFIES_SNAP, abi_version=1, size=160, ts_secret=bytes(16),
                              flags=F_SYNCOOKIE | F_SYNCOOKIE6 | F_NET_SECRET | F_ALG_SEQ_AND_TS_OFF)
    assert legacy_text(old) == LEGACY_JIFFIES.replace("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf", "0" * 32)
    older = dataclasses.replace(old, flags=old.flags & ~F_ALG_SEQ_AND_TS_OFF | F_TS_SECRET | F_ALG_TS_SECRET,
                                ts_secret=bytes([0xEE] * 16))
    assert legacy_text(older).endswith("timestamp_secret " + "ee" * 16 + "\n")


def test_legacy_text_in_wall_mode_leads_a_jiffies_consumer_to_the_wall_counter():
    # The consumer's counter: jiffies // (60 * HZ); exactly the kernel's wall minute.
    for realtime_ns in (SNAP.realtime_ns, 60 * 10**9 * 29_398_241 - 1, 60 * 10**9 * 29_398_241):
        snap = dataclasses.replace(SNAP, realtime_ns=realtime_ns, cookie_count=-1)
        jiffies = int(dict(line.split() for line in legacy_text(snap).splitlines())["jiffies"])
        assert jiffies // (60 * 250) == snap.cookie_count == realtime_ns // (60 * 10**9)


def test_get_text_is_exactly_the_isn_sync_lines():
    assert get_text(SNAP, FACTS) == GET
    assert [line.split(": ")[0] for line in GET.splitlines()] == [
        "uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
        "tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling"]
    assert answers.PROTOCOL_LEVEL == "26.04"


# The `get` lines of each isn_sync release, as ../shared/notes/official-agents.md records them
# ("get by release": v23.08 8 lines, v24.10-v25.02 9 (+version), v25.06 10 (+time), v26.04 11
# (+syncookie6_secret)), written out here independently of answers.PROTOCOL_FIELDS.
SYSCTLS = ["tcp_ecn", "tcp_sack", "tcp_timestamps", "tcp_window_scaling"]
LINES_BY_RELEASE = {
    "23.08": ["uname", "net_secret", "syncookie_secret", "ts_secret", *SYSCTLS],
    "24.10": ["uname", "version", "net_secret", "syncookie_secret", "ts_secret", *SYSCTLS],
    "25.02": ["uname", "version", "net_secret", "syncookie_secret", "ts_secret", *SYSCTLS],
    "25.06": ["uname", "version", "time", "net_secret", "syncookie_secret", "ts_secret", *SYSCTLS],
    "26.04": ["uname", "version", "time", "net_secret", "syncookie_secret", "syncookie6_secret", "ts_secret",
              *SYSCTLS],
}


@pytest.mark.parametrize("level", LINES_BY_RELEASE)
def test_get_at_each_protocol_level_is_that_releases_lines(level, device):
    text = get_text(SNAP, FACTS, level)
    assert [line.split(": ")[0] for line in text.splitlines()] == LINES_BY_RELEASE[level]
    full = dict(line.split(": ", 1) for line in GET.splitlines())
    for line in text.splitlines():
        name, value = line.split(": ", 1)
        assert value == (level if name == "version" else full[name])  # the level names itself
    answer = respond("get", device, lambda: FACTS, level=level)  # what serve --protocol LEVEL answers
    assert (answer.stdout, answer.exit_status) == (text, 0)
    assert json.loads(respond("get json", device, lambda: FACTS, level=level).stdout)["version"] == level
    assert set(answers.PROTOCOL_LEVELS) == set(LINES_BY_RELEASE)


def test_get_text_does_not_change_with_our_facts_or_clock_mode():
    other = HostFacts(os_name="Linux", kernel_release="7.2.13+deb14-amd64", agent_version="9.9", clock_synced=None)
    assert get_text(SNAP, other) == get_text(JIFFIES_SNAP, FACTS) == GET


def test_json_answer_has_documented_schema_and_values():
    obj = json_answer(SNAP, FACTS)
    assert validate_json_answer(obj) == []
    assert list(obj) == list(answers.JSON_FIELDS)
    assert obj["schema_version"] == 2
    assert (obj["uname"], obj["version"], obj["kernel_release"], obj["agent_version"]) == (
        "Linux", "26.04", "6.1.0-56-amd64", "1.2.3")
    assert obj["syncookie6_secret"] == bytes(range(32, 64)).hex()
    assert obj["ts_secret"] == bytes(range(0xC0, 0xD0)).hex()
    assert obj["secrets_present"] == {"syncookie_secret": True, "syncookie6_secret": True,
                                      "net_secret": True, "ts_secret": True}
    assert (obj["cookie_clock"], obj["cookie_count"]) == ("wall", 1_763_894_400 // 60)
    assert obj["jiffies"] == 4_295_792_296  # the real one; only the legacy text shows wall jiffies
    assert (obj["uptime_ms"], obj["tcp_clock_ms"], obj["ts_shift_ms"]) == (2957813705, 0x1_2345_6789,
                                                                          2_366_062_656)
    assert obj["isn_algorithm"] == "seq_and_ts_off" and obj["ts_offset_hook"] is True
    assert (obj["cookie_accept"], obj["sendsyn_drop"], obj["sendsyn_dropped"]) == (True, True, 17)
    assert (obj["set_allowed"], obj["set_generation"]) == (False, 3)
    assert obj["clock_synced"] is True
    assert (obj["abi_version"], obj["snapshot_size"]) == (2, 200)
    assert json.loads(json.dumps(obj)) == obj


def test_json_answer_in_jiffies_mode():
    obj = json_answer(JIFFIES_SNAP, FACTS)
    assert validate_json_answer(obj) == []
    assert (obj["cookie_clock"], obj["cookie_count"]) == ("jiffies", 4_295_792_296 // (60 * 250))
    assert (obj["uptime_ms"], obj["ts_shift_ms"]) == (591751049, 0)


@pytest.mark.parametrize("breakage, problem", [
    (lambda o: o.pop("net_secret"), "net_secret: missing"),
    (lambda o: o.update(hz=True), "hz: expected integer"),
    (lambda o: o.update(hz="250"), "hz: expected integer"),
    (lambda o: o.update(net_secret="00" * 15), "net_secret: expected hex16"),
    (lambda o: o.update(syncookie_secret="AB" * 32), "syncookie_secret: expected hex32"),
    (lambda o: o.update(clock_synced=1), "clock_synced: expected boolean or null"),
    (lambda o: o["secrets_present"].pop("ts_secret"), "secrets_present: expected presence"),
    (lambda o: o.update(cookie_clock="boot"), "cookie_clock: expected cookie clock"),
    (lambda o: o.pop("set_generation"), "set_generation: missing"),
    (lambda o: o.update(schema_version=1), "schema_version: 1, this agent knows 2"),
])
def test_validate_json_answer_finds_problems(breakage, problem):
    obj = json_answer(SNAP, FACTS)
    breakage(obj)
    assert validate_json_answer(obj) == [problem]


def test_validate_json_answer_rejects_non_objects():
    assert validate_json_answer([1]) == ["answer is not a JSON object"]


@pytest.fixture
def device(tmp_path):
    path = tmp_path / "snapshot"
    path.write_bytes(encode(SNAP))
    return str(path)


def facts_never_needed() -> HostFacts:
    raise AssertionError("facts read for an answer that does not need them")


@pytest.mark.parametrize("command", [None, "get-tcp-secrets", "  get-tcp-secrets\n"])
def test_respond_legacy(device, command):
    assert respond(command, device, facts_never_needed) == answers.Answer(LEGACY, "", EXIT_OK, "ok")


@pytest.mark.parametrize("command", ["get", "get\n", " get "])
def test_respond_get(device, command):
    assert respond(command, device, lambda: FACTS).stdout == GET


@pytest.mark.parametrize("command", ["get json", "get   json\n", "get\tjson"])
def test_respond_get_json(device, command):
    answer = respond(command, device, lambda: FACTS)
    assert answer.exit_status == EXIT_OK
    assert json.loads(answer.stdout) == json_answer(SNAP, FACTS)
    assert answer.stdout.count("\n") == 1


@pytest.mark.parametrize("command, message", [
    ("set;" + ";".join(["0"] * 8), "anycast set is not enabled on this agent\n"),
    ("set", "anycast set is not enabled on this agent\n"),
    ("set;x", "anycast set is not enabled on this agent\n"),
    ("get;x", "get takes no arguments (use `get` or `get json`)\n"),
    ("GET", "unknown command (known: get, get json, get-tcp-secrets)\n"),
    ("", "unknown command (known: get, get json, get-tcp-secrets)\n"),
    ("get\udcff", "command is not valid UTF-8\n"),
    ("x" * 257, "command too long (257 characters, at most 256)\n"),
])
def test_respond_usage_errors_exit_1_one_line(device, command, message):
    answer = respond(command, device, facts_never_needed)
    assert (answer.stdout, answer.stderr, answer.exit_status) == ("", message, EXIT_USAGE)
    assert answer.result  # something to log


def test_respond_device_missing(tmp_path):
    answer = respond("get", str(tmp_path / "absent"), lambda: FACTS)
    assert (answer.stdout, answer.stderr, answer.exit_status) == ("", "tcpsecrets module not loaded\n",
                                                                  EXIT_NO_DEVICE)


@pytest.mark.parametrize("content, reason", [
    (b"", "snapshot too short: 0 bytes"),
    (b"\x00" * STRUCT_SIZE, "bad snapshot magic 0x00000000"),
    (encode(SNAP)[:60], "does not fit 60 bytes read"),
])
def test_respond_bad_snapshot(tmp_path, content, reason):
    path = tmp_path / "snapshot"
    path.write_bytes(content)
    answer = respond("get json", str(path), lambda: FACTS)
    assert answer.exit_status == EXIT_BAD_SNAPSHOT and answer.stdout == ""
    assert answer.stderr.startswith(f"bad snapshot from {path}: ") and reason in answer.stderr


def test_respond_unreadable_device(tmp_path):
    answer = respond("get", str(tmp_path), lambda: FACTS)  # a directory: read() fails
    assert answer.exit_status == EXIT_BAD_SNAPSHOT
    assert answer.stderr == f"cannot read {tmp_path}: Is a directory\n"


def test_log_results_never_hold_secrets(device):
    for command in (None, "get", "get json", "nonsense"):
        result = respond(command, device, lambda: FACTS).result
        assert SNAP.net_secret.hex() not in result and SNAP.syncookie_secret.hex()[:16] not in result


def test_loggable_command_keeps_arguments_out():
    from mitigator_agent.answers import loggable_command
    assert loggable_command(None) == "(none)"
    assert loggable_command(" get json ") == "get json"
    assert loggable_command("get-tcp-secrets") == "get-tcp-secrets"
    secret = "00112233445566778899aabbccddeeff"
    logged = loggable_command(f"set;{secret};x")
    assert logged == f"set...(+{len(secret) + 3} chars not logged)" and secret not in logged
    assert secret not in loggable_command(f"get {secret}")
    assert loggable_command("x" * 100) == "(unprintable verb)...(+100 chars not logged)"


@pytest.mark.parametrize("command, logged", [
    ("nonsense", "nonsense"),
    ("reboot now", "reboot...(+4 chars not logged)"),
    ("get-tcp-secrets;x", "get-tcp-secrets...(+2 chars not logged)"),
    ("abcdefghijklmnop", "abcdefghijklmnop"),                      # 16 letters: the limit
    ("abcdefghijklmnopq", "(unprintable verb)...(+17 chars not logged)"),
    ("set,00112233aabbccdd;x", "(unprintable verb)...(+22 chars not logged)"),  # the case
    ("00112233445566778899aabbccddeeff", "(unprintable verb)...(+32 chars not logged)"),
    ("GET", "(unprintable verb)...(+3 chars not logged)"),
    ("get\udcff", "(unprintable verb)...(+4 chars not logged)"),
    ("g\u0435t", "(unprintable verb)...(+3 chars not logged)"),      # Cyrillic e
    ("", "(empty)"),
    ("  ", "(empty)"),
])
def test_only_verbs_matching_lowercase_letters_and_dashes_up_to_16_are_logged(command, logged):
    from mitigator_agent.answers import loggable_command
    assert loggable_command(command) == logged
