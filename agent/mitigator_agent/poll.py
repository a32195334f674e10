"""``mitigator-agent poll``: do what a MITIGATOR instance does, and fail the way ssh does.

``get json`` over SSH with the instance's private key, the answer
validated.  Every failure is one line in the words OpenSSH uses for the
same mistake (``connect to host H port P: Connection refused``,
``Could not resolve hostname H: ...``, ``Load key "K": invalid format``,
``Permissions 0644 for 'K' are too open.``), followed by what to do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import json
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import List, Optional

import asyncssh

from .answers import GET_JSON_COMMAND, validate_json_answer

FINGERPRINT_PREFIX = "SHA256:"


class PollError(Exception):
    """A poll that could not be done; the message is the one line to print."""


@dataclass
class PollResult:
    """The validated answer (pretty JSON) and warnings; ``exit_status`` 0 when all went well."""

    exit_status: int
    output: str = ""
    problems: List[str] = field(default_factory=list)


def normalise_fingerprint(text: str) -> str:
    """``SHA256:BASE64`` from ``SHA256:...``, a bare base64 digest, or one with ``=`` padding.

    Raises ValueError when it is not a SHA-256 fingerprint (MD5's
    ``aa:bb:...`` included), with what to give instead.
    """
    value = text.strip()
    if value.upper().startswith(FINGERPRINT_PREFIX):
        value = value[len(FINGERPRINT_PREFIX):]
    value = value.rstrip("=")
    try:
        digest = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"{text!r} is not a SHA256 fingerprint; give what `mitigator-agent host-key` prints"
                         " on the agent (SHA256:...)")
    return FINGERPRINT_PREFIX + value


def load_client_key(path: str) -> asyncssh.SSHKey:
    """The instance's private key, refused for the reasons ssh refuses it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PollError(f'Load key "{path}": {exc.strerror or exc}') from None
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise PollError(f'Load key "{path}": {exc.strerror or exc}') from None
    if data.lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-")):
        raise PollError(f'Load key "{path}": invalid format: that is a public key; give the private key'
                        f" (the file without .pub)")
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        raise PollError(f"Permissions {stat.S_IMODE(st.st_mode):04o} for '{path}' are too open: a private key"
                        f" must not be accessible by others; run chmod 600 {path}")
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
        if "assphrase" in str(exc):
            raise PollError(f'Load key "{path}": the key is encrypted; give an unencrypted key'
                            " (as MITIGATOR uses)") from None
        raise PollError(f'Load key "{path}": invalid format') from None


def _connect_error(host: str, port: int, exc: BaseException, timeout: float) -> str:
    where = f"connect to host {host} port {port}"
    if isinstance(exc, socket.gaierror):
        return f"Could not resolve hostname {host}: {exc.strerror}"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{where}: Connection timed out (no answer within {timeout:g} s; a firewall in the way?)"
    if isinstance(exc, OSError):
        if exc.errno == errno.ECONNREFUSED:
            return f"{where}: Connection refused (is the agent running and listening there? mitigator-agent check)"
        return f"{where}: {exc.strerror or exc}"
    return f"{where}: {exc}"


async def poll(host: str, port: int, user: str, key_path: str, known_hosts: Optional[str],
               host_fingerprint: Optional[str], timeout: float) -> PollResult:
    """Run ``get json`` like MITIGATOR; raises PollError with ssh-like words."""
    client_key = load_client_key(key_path)
    try:
        conn = await asyncio.wait_for(asyncssh.connect(
            host, port, username=user, client_keys=[client_key], known_hosts=known_hosts,
            agent_path=None, config=None, preferred_auth="publickey"), timeout)
    except asyncssh.PermissionDenied:
        raise PollError(f"{user}@{host}: Permission denied (publickey): the agent does not admit"
                        f" {client_key.get_fingerprint('sha256')}; add its public key on the agent:"
                        " mitigator-agent keys add 'ssh-ed25519 ... NAME'") from None
    except asyncssh.HostKeyNotVerifiable:
        raise PollError(f"Host key verification failed: the key of {host} is not in {known_hosts};"
                        " add it, or pin it with --host-fingerprint") from None
    except asyncssh.DisconnectError as exc:
        raise PollError(f"{host} port {port}: {exc.reason}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise PollError(_connect_error(host, port, exc, timeout)) from None
    async with conn:
        server_key = conn.get_server_host_key()
        seen = server_key.get_fingerprint("sha256") if server_key else "?"
        if host_fingerprint is not None and seen != host_fingerprint:
            raise PollError(f"Host key verification failed: {host} port {port} has host key {seen}, expected"
                            f" {host_fingerprint}; compare with what `mitigator-agent host-key` prints on the agent")
        problems = [] if known_hosts or host_fingerprint else [f"warning: host key {seen} not verified"]
        try:
            result = await asyncio.wait_for(conn.run(GET_JSON_COMMAND), timeout)
        except asyncio.TimeoutError:
            raise PollError(f"{host} port {port}: no answer to `{GET_JSON_COMMAND}` within {timeout:g} s") from None
    stdout = str(result.stdout or "")
    if result.exit_status != 0:
        return PollResult(1, "", problems + [f"agent answered exit status {result.exit_status}:"
                                             f" {str(result.stderr).strip()}"])
    try:
        answer = json.loads(stdout)
    except ValueError as exc:
        return PollResult(1, "", problems + [f"answer is not JSON: {exc}"])
    invalid = validate_json_answer(answer)
    if invalid:
        return PollResult(1, "", problems + [f"invalid answer: {problem}" for problem in invalid])
    return PollResult(0, json.dumps(answer, indent=2) + "\n", problems)
