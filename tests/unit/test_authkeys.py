"""Keys-file parsing, options, strict modes, live re-reading and atomic edits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh
import pytest

from mitigator_agent.authkeys import (
    KeysFile,
    KeysFileError,
    add_key,
    parse_keys,
    parse_options,
    remove_keys,
    strict_modes_problem,
)

ED1 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator1")
ED2 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator2")
RSA = asyncssh.generate_private_key("ssh-rsa", key_size=1024, comment="old")
ECDSA = asyncssh.generate_private_key("ecdsa-sha2-nistp256", comment="ec")
# What a server sees from a client: public halves only.
ED1_OFFERED, ED2_OFFERED, RSA_OFFERED = (k.convert_to_public() for k in (ED1, ED2, RSA))


def public(key: asyncssh.SSHKey, comment: str = "") -> str:
    fields = key.export_public_key().decode().split()[:2]
    return " ".join(fields + ([comment] if comment else []))


def parse(text: str):
    return parse_keys(text, "KEYS")


def test_instance_name_is_the_comment_and_may_hold_spaces():
    parsed = parse(public(ED1, "mitigator 1 (lab)") + "\n" + public(ED2) + "\n")
    assert parsed.warnings == ()
    assert [(e.line_number, e.instance) for e in parsed.entries] == [(1, "mitigator 1 (lab)"), (2, "")]
    assert parsed.entries[0].fingerprint == ED1.get_fingerprint("sha256")


def test_blank_lines_and_comments_are_ignored():
    parsed = parse("\n# a comment\n   \n" + public(ED1) + "\n")
    assert parsed.warnings == () and [e.line_number for e in parsed.entries] == [4]


@pytest.mark.parametrize("line, reason", [
    ("garbage", "malformed line"),
    ("two words", "malformed line"),
    ("ssh-ed25519", "key data missing"),
    ("ssh-ed25519 !!!notbase64", "not a valid ssh-ed25519 key"),
    ("ssh-ed25519 " + public(RSA).split()[1], "not a valid ssh-ed25519 key"),
    (public(RSA, "old"), "key type ssh-rsa refused: only ssh-ed25519 keys are admitted"),
    (public(ECDSA), "key type ecdsa-sha2-nistp256 refused"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA x", "key type ssh-ed25519-cert-v01@openssh.com refused"),
    ('from="127.0.0.1 ' + public(ED1), "unbalanced quote"),
    ("command=\"get\" " + public(ED1), "option 'command' is not supported by this agent"),
    ("environment=\"A=b\" " + public(ED1), "option 'environment' is not supported"),
    ("permitopen=\"h:1\" " + public(ED1), "option 'permitopen' is not supported"),
    ("pty " + public(ED1), "option 'pty' is not supported"),
    ("from=127.0.0.1 " + public(ED1), "value must be in double quotes"),
    ('from="" ' + public(ED1), "from= needs a quoted pattern list"),
    ('no-pty="x" ' + public(ED1), "option 'no-pty' takes no value"),
    (",no-pty " + public(ED1), "empty option name"),
])
def test_lines_that_admit_nobody_are_skipped_with_file_and_line(line, reason):
    parsed = parse(public(ED2) + "\n" + line + "\n")
    assert [e.instance for e in parsed.entries] == [""]  # the other line still counts
    assert len(parsed.warnings) == 1
    assert parsed.warnings[0].startswith("KEYS:2: ") and reason in parsed.warnings[0]
    assert parsed.warnings[0].endswith("; line skipped")


def test_supported_options_accepted_case_insensitively():
    line = 'restrict,No-Pty,no-port-forwarding,no-agent-forwarding,NO-X11-FORWARDING,no-user-rc ' + public(ED1)
    parsed = parse(line)
    assert parsed.warnings == ()
    assert parsed.entries[0].options == ("restrict", "no-pty", "no-port-forwarding",
                                         "no-agent-forwarding", "no-x11-forwarding", "no-user-rc")


def test_parse_options_quoting():
    assert parse_options('from="a,b",no-pty,from="c\\"d"') == [("from", "a,b"), ("no-pty", None),
                                                               ("from", 'c"d')]
    assert parse_options("") == []


@pytest.mark.parametrize("patterns, address, admitted", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "::1", False),
    ("10.0.0.0/8,::1", "::1", True),
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "192.0.2.1", False),
    ("192.0.2.*", "192.0.2.77", True),
    ("!192.0.2.66,192.0.2.*", "192.0.2.66", False),
    ("2001:db8::/32", "2001:db8::5", True),
])
def test_from_option_matches_the_connecting_address(patterns, address, admitted):
    entry = parse(f'from="{patterns}" {public(ED1)}').entries[0]
    assert entry.admits(ED1_OFFERED, address) is admitted
    assert entry.admits(ED2_OFFERED, address) is False


def test_uppercase_from_is_still_enforced():
    entry = parse(f'FROM="10.0.0.0/8" {public(ED1)}').entries[0]
    assert not entry.admits(ED1_OFFERED, "127.0.0.1")


def test_two_from_options_admit_nobody_as_in_sshd():
    """sshd refuses such a line ('multiple "from" clauses'): which one was meant is not known."""
    parsed = parse(f'from="10.0.0.0/8",from="10.1.0.0/16" {public(ED1)}')
    assert parsed.entries == ()
    assert parsed.warnings == ("KEYS:1: from= is given twice: write one from= with every pattern; line skipped",)


@pytest.mark.parametrize("patterns, why", [
    # The exclusion a lenient matcher dropped: 127.0.0.1/8 is no network, so the "!" pattern went.
    ("!127.0.0.1/8,127.0.0.0/8", "'127.0.0.1/8' has address bits set beyond its prefix: write 127.0.0.0/8"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR (address/prefix length)"),
    ("a, b", 'from="a, b" has white space: separate its patterns with commas only'),
    ("mitigator.example.com", "'mitigator.example.com' is not an address (host names are not looked up:"
                              " give addresses, CIDRs or address wildcards)"),
    ("*.example.com", "'*.example.com' is not an address pattern (host names are not looked up:"
                      " give addresses, CIDRs or address wildcards)"),
    ("192.0.2.1,", "an empty pattern"),
    ("!", "an empty pattern after '!'"),
    ("", 'from= needs a quoted pattern list, e.g. from="192.0.2.1"'),
])
def test_a_from_that_does_not_parse_admits_nobody_and_says_why(patterns, why):
    parsed = parse(f'from="{patterns}" {public(ED1)} m1\n{public(ED2)} m2\n')
    assert [e.instance for e in parsed.entries] == ["m2"]  # the other lines still count
    assert parsed.warnings == (f"KEYS:1: from= refused: {why}; the line admits nobody until it is fixed;"
                               " line skipped",)


def test_negations_hold_for_every_form():
    entry = parse(f'from="!127.0.0.0/24,!127.0.1.*,!::ffff:127.0.2.1,127.0.0.0/8" {public(ED1)}').entries[0]
    for refused in ("127.0.0.34", "127.0.1.9", "127.0.2.1", "::ffff:127.0.0.34", "10.0.0.1", "::1"):
        assert not entry.admits(ED1_OFFERED, refused), refused
    for admitted in ("127.0.3.1", "::ffff:127.0.3.1", "127.255.0.1"):
        assert entry.admits(ED1_OFFERED, admitted), admitted


def test_ipv6_patterns_match_the_address_not_its_spelling():
    entry = parse(f'from="2001:DB8::/32,!2001:db8:0:0::66" {public(ED1)}').entries[0]
    assert entry.admits(ED1_OFFERED, "2001:db8::5") and entry.admits(ED1_OFFERED, "2001:0db8:0::7")
    assert not entry.admits(ED1_OFFERED, "2001:db8::66") and not entry.admits(ED1_OFFERED, "2001:db9::1")
    wildcard = parse(f'from="2001:db8::*" {public(ED1)}').entries[0]
    assert wildcard.admits(ED1_OFFERED, "2001:DB8:0::1f") and not wildcard.admits(ED1_OFFERED, "2001:db9::1")


@pytest.mark.parametrize("glue", ["", " "])
def test_a_key_appended_without_a_newline_is_reported_as_two_merged_keys(glue):
    line = f"{public(ED1)} m1{glue}{public(ED2)} m2"
    parsed = parse(line + "\n")
    assert parsed.entries == ()
    [warning] = parsed.warnings
    assert warning.startswith("KEYS:1: two keys merged on one line: its comment holds another key at"
                              " 'ssh-ed25519 AAAAC3Nz...' (a key appended to a file without a final newline?):"
                              " put that key on a line of its own")


# --- strict modes ---------------------------------------------------------

@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


@pytest.fixture
def keys_path(keys_dir: Path) -> Path:
    path = keys_dir / "keys"
    path.write_text(public(ED1, "mitigator1") + "\n")
    path.chmod(0o644)
    return path


ME = frozenset({os.geteuid()})


def test_safe_file_has_no_problem(keys_path):
    assert strict_modes_problem(str(keys_path), keys_path.stat(), ME) is None


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_group_or_other_writable_file_is_unsafe(keys_path, mode):
    keys_path.chmod(mode)
    problem = strict_modes_problem(str(keys_path), keys_path.stat(), ME)
    assert problem == f"keys file {keys_path} is writable by group or others (mode {mode:04o})"


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_group_or_other_writable_directory_is_unsafe(keys_path, keys_dir, mode):
    keys_dir.chmod(mode)
    problem = strict_modes_problem(str(keys_path), keys_path.stat(), ME)
    assert problem is not None and problem.startswith(f"keys directory {keys_dir} is writable")


def test_owner_must_be_root_or_the_agent_user(keys_path):
    someone_else = frozenset({os.geteuid() + 12345})
    problem = strict_modes_problem(str(keys_path), keys_path.stat(), someone_else)
    assert problem == (f"keys file {keys_path} is owned by uid {os.geteuid()},"
                       f" not by uid {os.geteuid() + 12345}")


def test_not_a_regular_file(keys_dir):
    fifo = keys_dir / "fifo"
    os.mkfifo(fifo, 0o644)
    state = KeysFile(str(fifo), ME).state()  # must not block on the FIFO
    assert state.entries == () and state.refusal == f"{fifo} is not a regular file"


# --- the live file ----------------------------------------------------------

def test_keys_file_match(keys_path):
    keys = KeysFile(str(keys_path), ME)
    assert keys.match(ED1_OFFERED, "127.0.0.1").entry.instance == "mitigator1"
    assert keys.match(ED2_OFFERED, "127.0.0.1").reason == "key not in keys file"
    assert keys.match(RSA_OFFERED, "127.0.0.1").reason.startswith("key type ssh-rsa refused")


def test_unsafe_file_admits_nobody_and_logs_why_once(keys_path, caplog):
    keys = KeysFile(str(keys_path), ME)
    keys_path.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="mitigator_agent"):
        first = keys.match(ED1_OFFERED, "127.0.0.1")
        keys.match(ED1_OFFERED, "127.0.0.1")
    assert first.entry is None and "writable by group or others" in first.reason
    assert [r.getMessage() for r in caplog.records].count(
        f'keys-file-admits-nobody reason="keys file {keys_path} is writable by group or others (mode 0666)"'
        f' fix="run chmod go-w {keys_path}"') == 1
    keys_path.chmod(0o644)
    assert keys.match(ED1_OFFERED, "127.0.0.1").entry is not None


def test_missing_and_empty_files_admit_nobody(keys_dir):
    path = keys_dir / "keys"
    keys = KeysFile(str(path), ME)
    assert keys.state().refusal == f"keys file {path} does not exist"
    path.write_text("# nobody yet\n")
    assert keys.state().refusal == f"keys file {path} holds no usable key"


def test_edits_are_seen_on_the_next_check_and_parsed_once(keys_path, caplog):
    keys = KeysFile(str(keys_path), ME)
    with caplog.at_level(logging.INFO, logger="mitigator_agent"):
        keys.state()
        keys.state()
        with keys_path.open("a") as handle:
            handle.write("broken line\n" + public(ED2, "mitigator2") + "\n")
        state = keys.state()
        keys.state()
    assert [e.instance for e in state.entries] == ["mitigator1", "mitigator2"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("keys-file-loaded") for m in messages) == 2
    assert messages.count(f'keys-file-warning problem="{keys_path}:2: {"malformed line"}'
                          ' (expected: [options] ssh-ed25519 BASE64 [comment]); line skipped"') == 1


# --- atomic edits -------------------------------------------------------------

def test_add_creates_the_file(keys_dir):
    path = keys_dir / "keys"
    entry, outcome = add_key(str(path), public(ED1, "mitigator1"))
    assert outcome == "added" and entry.line_number == 1 and entry.instance == "mitigator1"
    assert path.read_text() == public(ED1, "mitigator1") + "\n"
    assert path.stat().st_mode & 0o777 == 0o644


def test_add_appends_keeps_mode_and_content_and_is_idempotent(keys_path, keys_dir):
    keys_path.write_text("# header\n" + public(ED1, "mitigator1"))  # no final newline
    keys_path.chmod(0o600)
    inode = keys_path.stat().st_ino
    entry, outcome = add_key(str(keys_path), f'from="192.0.2.1" {public(ED2, "mitigator2")}')
    assert outcome == "added" and entry.line_number == 3
    assert keys_path.read_text() == (f"# header\n{public(ED1, 'mitigator1')}\n"
                                     f'from="192.0.2.1" {public(ED2, "mitigator2")}\n')
    st = keys_path.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert st.st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in keys_dir.iterdir()) == ["keys", "keys.lock"]  # no temp file left
    again, outcome = add_key(str(keys_path), f'from="192.0.2.1" {public(ED2, "mitigator2")}')
    assert outcome == "already present" and again.line_number == 3


@pytest.mark.parametrize("line, reason", [
    (public(RSA, "old"), "key type ssh-rsa refused"),
    ("nonsense", "malformed line"),
    ("   ", "no key given"),
    (public(ED1) + "\n" + public(ED2), "one key per line"),
    ('command="get" ' + public(ED1), "option 'command' is not supported"),
])
def test_add_refuses_what_would_not_be_admitted(keys_path, line, reason):
    before = keys_path.read_bytes()
    with pytest.raises(KeysFileError, match=reason):
        add_key(str(keys_path), line)
    assert keys_path.read_bytes() == before


@pytest.mark.parametrize("selector", ["mitigator2", ED2.get_fingerprint("sha256"), public(ED2, "whatever")])
def test_remove_by_name_fingerprint_or_key_keeps_other_lines(keys_path, selector):
    original = f"# header\n{public(ED1, 'mitigator1')}\nbroken line\n{public(ED2, 'mitigator2')}\n# end\n"
    keys_path.write_text(original)
    keys_path.chmod(0o640)
    removed = remove_keys(str(keys_path), selector)
    assert [(e.line_number, e.instance) for e in removed] == [(4, "mitigator2")]
    assert keys_path.read_text() == f"# header\n{public(ED1, 'mitigator1')}\nbroken line\n# end\n"
    assert keys_path.stat().st_mode & 0o777 == 0o640


def test_remove_without_match_changes_nothing(keys_path):
    before = keys_path.read_bytes()
    with pytest.raises(KeysFileError, match="matches"):
        remove_keys(str(keys_path), "nobody")
    assert keys_path.read_bytes() == before
