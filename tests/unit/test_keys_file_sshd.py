"""The keys file read as sshd reads authorized_keys (issue 9, "Keys file").

Each test name states the sshd reasoning it pins: lines end at ``\\n`` only,
characters another reader would split or hide at refuse the line, edits
(any change of content) apply at once, StrictModes walks the resolved path
up to ``/`` and the last component is never followed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncssh
import pytest

from mitigator_agent.authkeys import (
    ADDED,
    REPLACED,
    UNCHANGED,
    KeysFile,
    KeysFileError,
    add_key,
    parse_keys,
    remove_keys,
    split_lines,
)

K1 = asyncssh.generate_private_key("ssh-ed25519")
K2 = asyncssh.generate_private_key("ssh-ed25519")
K1_OFFERED, K2_OFFERED = K1.convert_to_public(), K2.convert_to_public()
ME = frozenset({0, os.geteuid()})
IS_ROOT = os.geteuid() == 0


def public(key: asyncssh.SSHKey, comment: str = "") -> str:
    fields = key.export_public_key().decode().split()[:2]
    return " ".join(fields + ([comment] if comment else []))


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(public(K1, "m1") + "\n")
    path.chmod(0o644)
    return path


# --- lines end at \n only -------------------------------------------------------

# Every character str.splitlines() splits at, besides \n and \r\n, plus other
# control characters and non-ASCII white space.
SPLITTERS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r", "\x00", "\x7f",
             "\x1b", "\xa0", "\u3000"]


@pytest.mark.parametrize("splitter", SPLITTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_sshd_reads_one_line_up_to_newline_so_a_smuggled_second_key_admits_nobody(splitter):
    # The finding: with str.splitlines() K2 became a line of its own,
    # admitted from anywhere, while sshd reads one (restricted) line.
    text = f'{public(K2, "ok")}\nfrom="10.9.9.9" {public(K1, "m1")}{splitter}{public(K2, "x")}\n'
    parsed = parse_keys(text, "KEYS")
    assert [entry.instance for entry in parsed.entries] == ["ok"]
    assert len(parsed.warnings) == 1 and parsed.warnings[0].startswith("KEYS:2: ")
    column = text.split("\n")[1].index(splitter) + 1
    assert f"U+{ord(splitter):04X} at column {column}" in parsed.warnings[0]


def test_a_cr_before_the_newline_is_tolerated_like_a_dos_line_end():
    parsed = parse_keys(f"{public(K1, 'm1')}\r\n{public(K2, 'm2')}\r\n", "KEYS")
    assert parsed.warnings == () and [e.instance for e in parsed.entries] == ["m1", "m2"]


def test_split_lines_splits_at_newline_only():
    assert split_lines("a\x1cb\r\nc\u2028d\n\ne") == ["a\x1cb", "c\u2028d", "", "e"]


def test_tab_is_white_space_as_in_sshd():
    fields = public(K1).split()
    parsed = parse_keys(f"no-pty\t{fields[0]}\t{fields[1]}\tm1\n", "KEYS")
    assert parsed.warnings == () and parsed.entries[0].instance == "m1"


def test_an_invisible_format_character_in_the_instance_name_refuses_the_line():
    parsed = parse_keys(public(K1, "m1\u202egnp.exe") + "\n", "KEYS")
    assert parsed.entries == () and "invisible format character U+202E" in parsed.warnings[0]


def test_bytes_that_are_not_utf8_refuse_their_line_and_only_it(keys_path, caplog):
    keys_path.write_bytes(public(K1, "m1").encode() + b"\xff\n" + public(K2, "m2").encode() + b"\n")
    with caplog.at_level(logging.WARNING, logger="mitigator_agent"):
        state = KeysFile(str(keys_path), ME).state()
    assert [e.instance for e in state.entries] == ["m2"]
    assert any(f"{keys_path}:1: bytes that are not UTF-8" in r.getMessage() for r in caplog.records)


def test_non_ascii_instance_names_are_fine():
    parsed = parse_keys(public(K1, "митигатор-1") + "\n", "KEYS")
    assert parsed.warnings == () and parsed.entries[0].instance == "митигатор-1"


# --- keys add writes exactly what it means ------------------------------------------

@pytest.mark.parametrize("splitter", ["\x1c", "\x0b", "\u2028", "\x85", "\r"], ids=lambda c: f"U+{ord(c):04X}")
def test_keys_add_refuses_a_line_sshd_would_read_differently_and_writes_nothing(keys_path, splitter):
    before = keys_path.read_bytes()
    with pytest.raises(KeysFileError, match=f"U\\+{ord(splitter):04X}"):
        add_key(str(keys_path), f'from="10.9.9.9" {public(K2, "m2")}{splitter}{public(K2, "x")}')
    assert keys_path.read_bytes() == before


def test_keys_add_of_a_present_key_with_new_from_replaces_its_options_instead_of_leaving_it_open(keys_path):
    keys = KeysFile(str(keys_path), ME)
    assert keys.match(K1_OFFERED, "127.0.0.1").entry is not None
    entry, outcome = add_key(str(keys_path), f'from="192.0.2.1" {public(K1, "m1")}')
    assert outcome == REPLACED and entry.line_number == 1 and entry.from_patterns == ("192.0.2.1",)
    assert keys_path.read_text() == f'from="192.0.2.1" {public(K1, "m1")}\n'
    assert keys.match(K1_OFFERED, "127.0.0.1").entry is None
    assert keys.match(K1_OFFERED, "192.0.2.1").entry is not None


def test_keys_add_of_a_present_key_without_a_name_keeps_its_name(keys_path):
    """The name carries the key's anycast permission: re-adding the bare key must not drop it."""
    entry, outcome = add_key(str(keys_path), public(K1))
    assert (outcome, entry.instance) == (UNCHANGED, "m1")
    entry, outcome = add_key(str(keys_path), f'from="192.0.2.1" {public(K1)}')
    assert (outcome, entry.instance) == (REPLACED, "m1")
    assert keys_path.read_text() == f'from="192.0.2.1" {public(K1, "m1")}\n'
    entry, outcome = add_key(str(keys_path), f'from="192.0.2.1" {public(K1, "renamed")}')  # a new name wins
    assert (outcome, entry.instance) == (REPLACED, "renamed")


def test_keys_add_replacement_drops_every_other_line_of_the_same_key(keys_path):
    keys_path.write_text(f"# c\n{public(K1, 'm1')}\n{public(K2, 'm2')}\n{public(K1, 'again')}\n")
    entry, outcome = add_key(str(keys_path), f"restrict {public(K1, 'm1')}")
    assert outcome == REPLACED and entry.line_number == 2
    assert keys_path.read_text() == f"# c\nrestrict {public(K1, 'm1')}\n{public(K2, 'm2')}\n"


def test_keys_add_of_the_same_line_again_changes_nothing(keys_path):
    before = keys_path.stat()
    entry, outcome = add_key(str(keys_path), public(K1, "m1"))
    assert outcome == UNCHANGED and entry.line_number == 1
    assert keys_path.stat().st_ino == before.st_ino


def test_keys_add_of_a_new_key_appends_it(keys_path):
    entry, outcome = add_key(str(keys_path), public(K2, "m2") + "\r\n")
    assert outcome == ADDED and entry.line_number == 2
    assert keys_path.read_text() == f"{public(K1, 'm1')}\n{public(K2, 'm2')}\n"


def test_keys_add_never_follows_a_symlinked_keys_file(tmp_path, keys_path):
    link = tmp_path / "link"
    link.symlink_to(keys_path)
    with pytest.raises(KeysFileError, match="symbolic link"):
        add_key(str(link), public(K2, "m2"))


def test_keys_remove_keeps_other_lines_byte_for_byte_with_crs(keys_path):
    keys_path.write_bytes(f"# c\r\n{public(K1, 'm1')}\r\n{public(K2, 'm2')}\r\n".encode())
    removed = remove_keys(str(keys_path), "m1")
    assert [e.instance for e in removed] == ["m1"]
    assert keys_path.read_bytes() == f"# c\r\n{public(K2, 'm2')}\r\n".encode()


# --- reload on any change of content ------------------------------------------------

def test_same_size_rewrite_with_the_old_mtime_is_seen_because_content_is_compared(keys_path):
    keys = KeysFile(str(keys_path), ME)
    assert keys.match(K1_OFFERED, "127.0.0.1").entry is not None
    old = keys_path.stat()
    keys_path.write_text(public(K2, "m1") + "\n")  # same inode, same size (both ed25519, same name)
    os.utime(keys_path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = keys_path.stat()
    assert (new.st_ino, new.st_size, new.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)
    assert keys.match(K1_OFFERED, "127.0.0.1").entry is None
    assert keys.match(K2_OFFERED, "127.0.0.1").entry is not None


def test_cp_p_of_a_same_size_file_revokes_the_old_key_at_once(tmp_path, keys_path):
    keys = KeysFile(str(keys_path), ME)
    assert keys.match(K1_OFFERED, "127.0.0.1").entry is not None
    replacement = tmp_path / "new"
    replacement.write_text(public(K2, "m1") + "\n")
    os.utime(replacement, ns=(keys_path.stat().st_atime_ns, keys_path.stat().st_mtime_ns))
    subprocess.run(["cp", "-p", str(replacement), str(keys_path)], check=True)
    assert keys.match(K1_OFFERED, "127.0.0.1").reason == "key not in keys file"


def test_unchanged_content_is_parsed_once(keys_path, caplog):
    keys = KeysFile(str(keys_path), ME)
    with caplog.at_level(logging.INFO, logger="mitigator_agent"):
        for _ in range(3):
            keys.state()
        os.utime(keys_path)  # touch: content unchanged
        keys.state()
    assert sum(r.getMessage().startswith("keys-file-loaded") for r in caplog.records) == 1


def test_a_file_larger_than_the_limit_admits_nobody(keys_path, monkeypatch):
    from mitigator_agent import authkeys
    monkeypatch.setattr(authkeys, "MAX_FILE_BYTES", 64)
    assert "larger than 64 bytes" in (KeysFile(str(keys_path), ME).state().refusal or "")


# --- StrictModes: the resolved path, every directory up to / ------------------------

def test_group_writable_directory_two_levels_up_is_refused_as_sshd_safe_path_walks_to_root(tmp_path):
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    keys = top / "sub" / "keys"
    keys.write_text(public(K1) + "\n")
    keys.chmod(0o644)
    top.chmod(0o775)
    refusal = KeysFile(str(keys), ME).state().refusal
    assert refusal == f"keys directory {top} is writable by group or others (mode 0775)"
    top.chmod(0o755)
    assert KeysFile(str(keys), ME).state().refusal is None


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_directory_owned_by_another_user_up_the_path_is_refused_as_sshd_does(tmp_path):
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    keys = top / "sub" / "keys"
    keys.write_text(public(K1) + "\n")
    os.chown(top, 4321, 4321)
    refusal = KeysFile(str(keys), ME).state().refusal
    assert refusal is not None and refusal.startswith(f"keys directory {top} is owned by uid 4321")


def test_symlinked_directory_is_judged_at_its_resolved_target_as_sshd_uses_realpath(tmp_path):
    # The finding: a keys path through a 0777 directory was accepted.
    open_dir = tmp_path / "open"
    (open_dir / "real").mkdir(parents=True)
    open_dir.chmod(0o777)
    (open_dir / "real" / "keys").write_text(public(K1) + "\n")
    (tmp_path / "safe").mkdir()
    (tmp_path / "safe" / "via").symlink_to(open_dir / "real")
    refusal = KeysFile(str(tmp_path / "safe" / "via" / "keys"), ME).state().refusal
    assert refusal == f"keys directory {open_dir} is writable by group or others (mode 0777)"


def test_keys_file_that_is_a_symlink_is_never_followed_as_with_o_nofollow(tmp_path, keys_path):
    link = tmp_path / "link"
    link.symlink_to(keys_path)
    assert KeysFile(str(link), ME).state().refusal == f"keys file {link} is a symbolic link (never followed)"


def test_keys_below_tmp_are_refused_as_sshd_refuses_a_mode_1777_directory():
    tmp = Path(tempfile.gettempdir())
    if (tmp.stat().st_mode & 0o022) == 0:
        pytest.skip(f"{tmp} is not writable by others here")
    directory = Path(tempfile.mkdtemp())
    try:
        keys = directory / "keys"
        keys.write_text(public(K1) + "\n")
        refusal = KeysFile(str(keys), ME).state().refusal
        assert refusal is not None and f"keys directory {tmp} is writable by group or others" in refusal
    finally:
        shutil.rmtree(directory)


def test_config_file_gets_the_same_walk_up_to_root(tmp_path):
    import click

    from mitigator_agent.config import ConfigError, load_defaults

    top = tmp_path / "etc"
    top.mkdir()
    config = top / "agent.toml"
    config.write_text("port = 1\n")
    top.chmod(0o777)
    with pytest.raises(ConfigError, match=f"config directory {top} is writable by group or others"):
        load_defaults(str(config), click.Command("x", params=[click.Option(["--port"])]), required=True)
    top.chmod(0o755)
    link = tmp_path / "link.toml"
    link.symlink_to(config)
    with pytest.raises(ConfigError, match="symbolic link"):
        load_defaults(str(link), click.Command("x", params=[click.Option(["--port"])]), required=True)
