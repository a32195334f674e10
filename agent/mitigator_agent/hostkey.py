"""The agent's SSH host key.

MITIGATOR pins the host key, so it is created once (ed25519, the only type
served: a key of another type is refused, never served; mode 0600,
written atomically so a crash never leaves a truncated key) and never
regenerated: an existing key that cannot be read, or that group/others can
access, stops the agent with a clear error instead of being replaced.
Next to it ``PATH.pub`` holds the public half for the administrator.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Tuple

import asyncssh

from .atomic import write_file_atomically
from .runas import current_user_name

DEFAULT_HOST_KEY_PATH = "/opt/mitigator_agent/host.ed25519"
HOST_KEY_TYPE = "ssh-ed25519"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

# ssh-keygen -l names key types by family.
_KEYGEN_TYPE_NAMES = {
    "ssh-ed25519": "ED25519",
    "ssh-rsa": "RSA",
    "ssh-dss": "DSA",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
}


class HostKeyError(Exception):
    """The host key exists but cannot be used; the message says why."""


def load_host_key(path: str) -> asyncssh.SSHKey:
    """Read an existing host key; FileNotFoundError when there is none."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise HostKeyError(f"host key {path} is {kind}; name the key file itself,"
                           f" e.g. {os.path.join(path, 'host.ed25519') if stat.S_ISDIR(st.st_mode) else DEFAULT_HOST_KEY_PATH}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HostKeyError(
            f"host key {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
        )
    try:
        key = asyncssh.read_private_key(path)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise HostKeyError(f"host key {path} is not a usable private key ({exc});"
                           " it is not replaced because MITIGATOR pins it") from None
    key.set_filename(None)  # else asyncssh reports the path as the comment of a key without one
    algorithm = key.algorithm.decode("ascii", "replace")
    if algorithm != HOST_KEY_TYPE:
        # Only ed25519 is offered (server.SIGNATURE_ALGS): serving another key would be a quiet
        # downgrade, and MITIGATOR pins what it first saw.
        raise HostKeyError(f"host key {path} is {algorithm}, not {HOST_KEY_TYPE}: the agent serves ed25519 host keys"
                           f" only; point host-key at an ed25519 key (a new key changes the fingerprint MITIGATOR"
                           " pins)")
    return key


def load_or_create_host_key(path: str) -> Tuple[asyncssh.SSHKey, bool]:
    """Return (key, created): load the key at ``path`` or create it if missing.

    Creation never overwrites: if another process creates the file first,
    that key is loaded and used.  A key that cannot be created raises
    HostKeyError naming the path and the fix (never the temporary name).
    """
    try:
        return load_host_key(path), False
    except FileNotFoundError:
        pass
    key = asyncssh.generate_private_key(HOST_KEY_TYPE, comment=f"mitigator-agent@{socket.gethostname()}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        write_file_atomically(path, key.export_private_key("openssh"), PRIVATE_MODE, replace=False)
    except FileExistsError:
        return load_host_key(path), False
    except FileNotFoundError:
        raise HostKeyError(f"cannot create host key {path}: its directory {directory} does not exist;"
                           f" create it for the key's owner: mkdir -p {directory} && chown {current_user_name()} {directory}"
                           ) from None
    except PermissionError:
        raise HostKeyError(f"cannot create host key {path}: {current_user_name()} may not write in {directory};"
                           f" give the directory to the agent's user: chown {current_user_name()} {directory}") from None
    except OSError as exc:
        raise HostKeyError(f"cannot create host key {path}: {exc.strerror or exc}") from None
    write_file_atomically(path + ".pub", key.export_public_key("openssh"), PUBLIC_MODE)
    return key, True


def key_bits(key: asyncssh.SSHKey) -> int:
    """Key size in bits, as ssh-keygen reports it."""
    if key.algorithm == b"ssh-ed25519":
        return 256
    return int(getattr(key.pyca_key, "key_size", 0))


def fingerprint_line(key: asyncssh.SSHKey) -> str:
    """``256 SHA256:... comment (ED25519)``: what ``ssh-keygen -l -f`` prints.

    A key without a comment shows ``no comment`` (ssh-keygen would show
    the file name or nothing, depending on how it found the key).
    """
    algorithm = key.algorithm.decode("ascii")
    comment = key.get_comment() or "no comment"
    type_name = _KEYGEN_TYPE_NAMES.get(algorithm, algorithm.upper())
    return f"{key_bits(key)} {key.get_fingerprint('sha256')} {comment} ({type_name})"
