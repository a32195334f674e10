"""Fuzzing the keys file: lines, options, from= patterns, `keys add`.

The keys file is admin input that decides who gets the secrets.  For any
text: parsing never raises (a line either is an entry or is skipped with a
warning naming its line), what parses prints back to the same entry, a
refused line changes nothing about the other lines, lines end at ``\\n``
only, a from= list never errs at match time and its negations hold, and a
refused `keys add` leaves the file byte for byte as it was.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import List, Optional

import asyncssh
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from fuzzing import safe_dir  # noqa: F401  (fixture; also loads the profile)
from mitigator_agent.authkeys import (
    KeyEntry,
    KeysFileError,
    _LineError,
    add_key,
    names_particular_sources,
    parse_keys,
    parse_line,
    split_lines,
)

ED25519 = [asyncssh.generate_private_key("ssh-ed25519", comment=f"k{n}") for n in range(3)]
OTHER_KEYS = [asyncssh.generate_private_key("ecdsa-sha2-nistp256")]


def public_fields(key: asyncssh.SSHKey) -> str:
    """``TYPE BASE64`` of a key, no comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


KEY_FIELDS = [public_fields(key) for key in ED25519]
# Characters that made trouble before, or that readers disagree on.
TRICKY = st.sampled_from(['"', "\\", ",", "=", " ", "\t", "\r", "\n", "#", "!", "*", "?", "/", ":", "\x00",
                          "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029", "\u00a0", "\u202e",
                          "\ufeff", "\udcff", "é"])
TEXT = st.text(st.one_of(st.characters(), TRICKY), max_size=40)
ADDRESS = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
PATTERN = st.one_of(
    ADDRESS,
    st.builds(lambda a, n: f"{a}/{n}", ADDRESS, st.integers(0, 129)),
    st.builds(lambda a: "!" + a, ADDRESS),
    st.sampled_from(["*", "*.*.*.*", "127.0.0.?", "10.*", "::*", "!*", "", "0.0.0.0/0", "::/0", "host.example"]),
    TEXT,
)
PATTERN_LIST = st.lists(PATTERN, min_size=1, max_size=5).map(",".join)
OPTION = st.one_of(
    st.builds(lambda p: f'from="{p}"', PATTERN_LIST),
    st.sampled_from(["no-pty", "restrict", "no-port-forwarding", "no-agent-forwarding", "no-X11-forwarding",
                     "no-user-rc", 'command="get"', "permitopen=\"*:*\"", "from", 'from=""', "FROM=\"1.2.3.4\"",
                     ",", '"', "from=1.2.3.4"]),
    TEXT,
)
KEY_PART = st.one_of(
    st.sampled_from(KEY_FIELDS),
    st.sampled_from([public_fields(key) for key in OTHER_KEYS]),
    st.builds(lambda t, d: f"{t} {d}", st.sampled_from(["ssh-ed25519", "ssh-rsa", "sk-ssh-ed25519@openssh.com",
                                                         "ssh-ed25519-cert-v01@openssh.com", "ecdsa-x"]),
              st.one_of(st.sampled_from([f.split()[1] for f in KEY_FIELDS]).map(lambda d: d[:-4]),
                        st.text(st.sampled_from("ABCDEFabcdef0123456789+/="), max_size=80))),
    TEXT,
)
LINE = st.one_of(
    st.builds(lambda options, key, sep, comment: (",".join(options) + " " if options else "") + key + sep + comment,
              st.lists(OPTION, max_size=3), KEY_PART, st.sampled_from([" ", "\t", "  "]), TEXT),
    TEXT,
)


def outcome(line: str) -> Optional[KeyEntry]:
    """parse_line's result; the only exception it may raise is _LineError (a skipped line)."""
    try:
        return parse_line(line, 1)
    except _LineError as exc:
        message = str(exc)
        assert message and "\n" not in message
        raise


def unmapped(text: str) -> ipaddress._BaseAddress:
    address = ipaddress.ip_address(text)
    return getattr(address, "ipv4_mapped", None) or address


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def same_entries(a: List[KeyEntry], b: List[KeyEntry]) -> bool:
    return [(e.fingerprint, e.instance, e.options, e.from_patterns) for e in a] == \
        [(e.fingerprint, e.instance, e.options, e.from_patterns) for e in b]


@given(LINE)
def test_a_line_is_an_entry_a_blank_or_a_refusal_nothing_else(line):
    try:
        entry = outcome(line)
    except _LineError:
        event("refused")
        return
    event("blank or comment" if entry is None else "entry")
    if entry is None:
        assert line.strip(" \t") == "" or line.strip(" \t").startswith("#")
        return
    assert entry.key.algorithm == b"ssh-ed25519"
    assert "\n" not in entry.instance and "\r" not in entry.instance


@given(LINE)
def test_an_entry_prints_back_to_the_same_entry(line):
    try:
        entry = outcome(line)
    except _LineError:
        return
    assume(entry is not None)
    printed = " ".join(filter(None, [",".join(entry.options), public_fields(entry.key), entry.instance]))
    again = parse_line(printed, 1)
    assert again is not None and same_entries([entry], [again])


@given(st.lists(LINE, max_size=8))
def test_a_refused_line_changes_nothing_about_the_others(lines):
    text = "\n".join(lines)
    parsed = parse_keys(text, "keys")
    refused = set()
    for number, line in enumerate(split_lines(text), start=1):
        try:
            parse_line(line, number)
        except _LineError:
            refused.add(number)
    assert len(parsed.warnings) == len(refused)
    for warning, number in zip(parsed.warnings, sorted(refused)):
        assert warning.startswith(f"keys:{number}: ") and warning.endswith("; line skipped")
        assert "\n" not in warning
    # The same file with every refused line made a comment: the same entries, same line numbers.
    commented = "\n".join("#" if number in refused else line
                          for number, line in enumerate(split_lines(text), start=1))
    again = parse_keys(commented, "keys")
    assert same_entries(list(parsed.entries), list(again.entries))
    assert [e.line_number for e in parsed.entries] == [e.line_number for e in again.entries]


@given(st.text(st.one_of(st.characters(), TRICKY), max_size=200))
def test_lines_end_at_newline_only(text):
    lines = split_lines(text)
    assert len(lines) == text.count("\n") + (0 if text == "" or text.endswith("\n") else 1)
    # Only a CR right before a newline (or at the very end) is dropped; the file's last newline ends
    # its last line ("\n\r" is two lines, the second a lone CR, dropped).
    kept = re.sub(r"\r(?=\n|\Z)", "", text)
    assert "\n".join(lines) == (kept[:-1] if text.endswith("\n") else kept)


@given(PATTERN_LIST, st.lists(ADDRESS, max_size=4), st.sampled_from(KEY_FIELDS))
def test_from_patterns_never_err_at_match_time_and_negations_hold(patterns, addresses, key_fields):
    try:
        entry = outcome(f'from="{patterns}" {key_fields} m')
    except _LineError:
        return
    assert entry is not None
    names_particular_sources(entry.from_patterns)
    entry.names_sources
    negated = [p[1:] for p in patterns.split(",") if p.startswith("!") and is_address(p[1:])]
    for address in addresses + negated:  # admits() is given peer addresses only
        admitted = entry.admits(entry.key, address)
        assert isinstance(admitted, bool)
        if "!" + address in patterns.split(","):
            assert not admitted, (patterns, address)


@given(ADDRESS, ADDRESS)
def test_a_from_naming_one_address_admits_it_and_no_other(address, other):
    entry = parse_line(f'from="{address}" {KEY_FIELDS[0]} m', 1)
    assert entry is not None
    assert entry.names_sources
    assert entry.admits(entry.key, address)
    if unmapped(other) != unmapped(address):  # an IPv4-mapped IPv6 address is its IPv4 address
        assert not entry.admits(entry.key, other)
    assert not entry.admits(ED25519[1], address)  # another key is never admitted by this line


BASE_KEYS = f'from="192.0.2.1" {KEY_FIELDS[0]} mitigator1\n# a comment\n{KEY_FIELDS[1]} mitigator2\nnot a key\n'


@pytest.fixture(scope="module")
def keys_path(safe_dir: Path) -> Path:
    return safe_dir / "keys"


@given(LINE)
def test_keys_add_writes_exactly_the_key_or_changes_nothing(keys_path, line):
    keys_path.write_text(BASE_KEYS)
    keys_path.chmod(0o644)
    before = keys_path.read_bytes()
    try:
        entry, result = add_key(str(keys_path), line)
    except KeysFileError as exc:
        event("keys add refused")
        assert str(exc) and "\n" not in str(exc)
        assert keys_path.read_bytes() == before
        return
    event(f"keys add: {result}")
    assert result in ("added", "replaced", "already present")
    parsed = parse_keys(keys_path.read_text(), "keys")
    mine = [e for e in parsed.entries if e.same_key(entry.key)]
    assert same_entries(mine, [entry])
    assert len(parsed.warnings) == 1  # the file's own bad line, still there
    others = [e for e in parse_keys(before.decode(), "keys").entries if not e.same_key(entry.key)]
    assert same_entries([e for e in parsed.entries if not e.same_key(entry.key)], others)
