"""``mitigator-agent poll``: do what a MITIGATOR instance does, and fail the way ssh does.

``get json`` over SSH with the instance's private key, the answer
validated.  Every failure is one line in the words OpenSSH uses for the
same mistake (``connect to host H port P: Connection refused``,
``Could not resolve hostname H: ...``, ``Load key "K": invalid format``,
``Permissions 0644 for 'K' are too open.``), followed by what to do.

The agent's host key is verified before anything is run, as ``ssh`` in
batch mode does: against a pinned fingerprint (``--host-fingerprint``), else
against a known_hosts file (``--known-hosts``, else ``~/.ssh/known_hosts``).
A host the file does not know is refused unless ``--accept-new`` is given,
which adds its key to the file (as ``ssh -o StrictHostKeyChecking=accept-new``);
a key other than the one the file holds is refused as *changed*, always.
HOST is a name or an address, ``[IPv6]``, ``HOST:PORT`` or ``[IPv6]:PORT``.
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
from typing import List, Optional, Tuple

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


def parse_target(text: str, port: Optional[int], default_port: int) -> Tuple[str, int]:
    """(host, port) from ``HOST``, ``[IPv6]``, ``HOST:PORT`` or ``[IPv6]:PORT`` and the --port given.

    A bare IPv6 address (two colons or more) has no port in it.  Raises ValueError when the text
    is none of these forms, or names another port than --port.
    """
    named: Optional[str] = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:] not in ("",) and not text[close + 1:].startswith(":"):
            raise ValueError(f"{text!r}: write [IPv6] or [IPv6]:PORT")
        host, rest = text[1:close], text[close + 1:]
        named = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, named = text.split(":")
    else:
        host = text
    if not host:
        raise ValueError(f"{text!r} names no host")
    if named is not None:
        if not named.isdigit() or not 1 <= int(named) <= 65535:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        if port is not None and port != int(named):
            raise ValueError(f"{text!r} names port {named}, --port {port}: give one")
        return host, int(named)
    return host, port if port is not None else default_port


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names HOST at PORT: ``HOST`` for port 22, else ``[HOST]:PORT`` (as ssh writes it)."""
    return host if port == 22 else f"[{host}]:{port}"


def default_known_hosts() -> str:
    return os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts")


def verify_host_key(server_key: asyncssh.SSHKey, host: str, addr: str, port: int, known_hosts: str,
                    accept_new: bool) -> List[str]:
    """Check the agent's host key against ``known_hosts``; the warnings to print (PollError if refused)."""
    seen = server_key.get_fingerprint("sha256")
    try:
        table = asyncssh.read_known_hosts(known_hosts) if os.path.exists(known_hosts) else None
    except (OSError, ValueError) as exc:
        raise PollError(f"known_hosts {known_hosts} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    trusted, revoked = [], []
    if table is not None:
        result = table.match(host, addr, port)
        trusted, revoked = list(result[0]), list(result[2])
    if any(key.public_data == server_key.public_data for key in revoked):
        raise PollError(f"Host key verification failed: {host} port {port} has host key {seen}, which {known_hosts}"
                        " marks as revoked")
    if any(key.public_data == server_key.public_data for key in trusted):
        return []
    if trusted:
        expected = ", ".join(sorted({key.get_fingerprint("sha256") for key in trusted}))
        raise PollError(f"Host key verification failed: the host key of {host} port {port} has CHANGED: it is {seen},"
                        f" {known_hosts} has {expected}; if the agent's key was replaced on purpose, remove the old"
                        f" entry (ssh-keygen -R '{known_hosts_name(host, port)}' -f {known_hosts}); else someone may be"
                        " in between")
    if not accept_new:
        raise PollError(f"Host key verification failed: no host key of {host} port {port} is known in {known_hosts};"
                        f" it has {seen}: pin it with --host-fingerprint (compare with what `mitigator-agent host-key`"
                        " prints on the agent), or take it on first use with --accept-new")
    line = f"{known_hosts_name(host, port)} {server_key.export_public_key('openssh').decode().split()[0]}" \
           f" {server_key.export_public_key('openssh').decode().split()[1]}\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(known_hosts)), mode=0o700, exist_ok=True)
        with open(known_hosts, "a") as handle:
            handle.write(line)
    except OSError as exc:
        raise PollError(f"cannot add the host key to {known_hosts}: {exc.strerror or exc}") from None
    return [f"Warning: Permanently added '{known_hosts_name(host, port)}' ({seen}) to {known_hosts}"]


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
               host_fingerprint: Optional[str], timeout: float, accept_new: bool = False) -> PollResult:
    """Run ``get json`` like MITIGATOR; raises PollError with ssh-like words.

    The host key is checked (see the module) before the command is sent: a key that does not
    verify never gets a command, and nothing it says is printed.
    """
    client_key = load_client_key(key_path)
    try:
        # Verified below, in words of our own, before anything is run: asyncssh's own check can
        # only say "not verifiable", never which of not known, changed or revoked it is.
        conn = await asyncio.wait_for(asyncssh.connect(
            host, port, username=user, client_keys=[client_key], known_hosts=None,
            agent_path=None, config=None, preferred_auth="publickey"), timeout)
    except asyncssh.PermissionDenied:
        raise PollError(f"{user}@{host}: Permission denied (publickey): the agent does not admit"
                        f" {client_key.get_fingerprint('sha256')}; add its public key on the agent:"
                        " mitigator-agent keys add 'ssh-ed25519 ... NAME'") from None
    except asyncssh.DisconnectError as exc:
        raise PollError(f"{host} port {port}: {exc.reason}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise PollError(_connect_error(host, port, exc, timeout)) from None
    async with conn:
        server_key = conn.get_server_host_key()
        if server_key is None:
            raise PollError(f"Host key verification failed: {host} port {port} showed no host key")
        seen = server_key.get_fingerprint("sha256")
        if host_fingerprint is not None:
            if seen != host_fingerprint:
                raise PollError(f"Host key verification failed: {host} port {port} has host key {seen}, expected"
                                f" {host_fingerprint}; compare with what `mitigator-agent host-key` prints on the"
                                " agent")
            problems: List[str] = []
        else:
            peer = conn.get_extra_info("peername")
            problems = verify_host_key(server_key, host, peer[0] if peer else host, port,
                                       known_hosts or default_known_hosts(), accept_new)
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
