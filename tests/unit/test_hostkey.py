"""Host key: created once 0600, never regenerated, fingerprint as ssh-keygen prints it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import asyncssh
import pytest

from mitigator_agent.atomic import write_file_atomically
from mitigator_agent.hostkey import (
    HostKeyError,
    fingerprint_line,
    load_host_key,
    load_or_create_host_key,
)

SSH_KEYGEN = shutil.which("ssh-keygen")

ME = pwd.getpwuid(os.geteuid()).pw_name


def keygen_fingerprint(path: Path) -> str:
    assert SSH_KEYGEN, "ssh-keygen (openssh-client) is needed"
    return subprocess.run([SSH_KEYGEN, "-l", "-f", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_created_once_with_mode_0600_and_public_half(tmp_path):
    path = tmp_path / "host.ed25519"
    key, created = load_or_create_host_key(str(path))
    assert created and key.algorithm == b"ssh-ed25519"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "host.ed25519.pub").read_text().split()[:2] == \
        key.export_public_key().decode().split()[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.ed25519", "host.ed25519.pub"]


def test_existing_key_is_loaded_never_regenerated(tmp_path):
    path = tmp_path / "host.ed25519"
    first, _ = load_or_create_host_key(str(path))
    content = path.read_bytes()
    second, created = load_or_create_host_key(str(path))
    assert not created and path.read_bytes() == content
    assert second.get_fingerprint("sha256") == first.get_fingerprint("sha256")


def test_fingerprint_matches_ssh_keygen(tmp_path):
    path = tmp_path / "host.ed25519"
    key, _ = load_or_create_host_key(str(path))
    assert fingerprint_line(key) == keygen_fingerprint(path)
    assert fingerprint_line(key).startswith("256 SHA256:") and fingerprint_line(key).endswith(" (ED25519)")


@pytest.mark.parametrize("algorithm, options, comment", [
    ("ssh-ed25519", {}, "admin@example"),
    ("ssh-rsa", {"key_size": 2048}, "rsa host"),
])
def test_fingerprint_of_other_keys(tmp_path, algorithm, options, comment):
    path = tmp_path / "host"
    key = asyncssh.generate_private_key(algorithm, comment=comment, **options)
    key.write_private_key(str(path))
    path.chmod(0o600)
    # fingerprint_line speaks ssh-keygen's words for any key; only ed25519 is ever loaded as a host key.
    assert fingerprint_line(asyncssh.read_private_key(str(path))) == keygen_fingerprint(path)
    if algorithm != "ssh-ed25519":
        with pytest.raises(HostKeyError, match=f"is {algorithm}, not ssh-ed25519"):
            load_host_key(str(path))


def test_key_without_comment_never_shows_its_path(tmp_path):
    path = tmp_path / "host"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    path.chmod(0o600)
    assert fingerprint_line(load_host_key(str(path))).endswith(" no comment (ED25519)")


def test_unusable_existing_key_is_an_error_not_replaced(tmp_path):
    path = tmp_path / "host.ed25519"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(HostKeyError, match="not replaced because MITIGATOR pins it"):
        load_or_create_host_key(str(path))
    assert path.read_bytes() == b"not a key"


def test_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "host.ed25519"
    load_or_create_host_key(str(path))
    path.chmod(0o644)
    with pytest.raises(HostKeyError, match=r"accessible by group or others \(mode 0644\); run chmod 600"):
        load_or_create_host_key(str(path))


def test_missing_directory_names_the_path_and_the_fix_never_a_temporary_name(tmp_path):
    path = tmp_path / "absent" / "host.ed25519"
    with pytest.raises(HostKeyError) as raised:
        load_or_create_host_key(str(path))
    assert str(raised.value) == (f"cannot create host key {path}: its directory {path.parent} does not exist;"
                                 f" create it for the key's owner: mkdir -p {path.parent} && chown {ME} {path.parent}")


def test_creation_never_clobbers_a_key_created_meanwhile(tmp_path):
    path = tmp_path / "host.ed25519"
    path.write_bytes(b"the other process's key")
    with pytest.raises(FileExistsError):
        write_file_atomically(str(path), b"ours", 0o600, replace=False)
    assert path.read_bytes() == b"the other process's key"
    assert [p.name for p in tmp_path.iterdir()] == ["host.ed25519"]
