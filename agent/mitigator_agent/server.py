"""The SSH server MITIGATOR polls (asyncssh).

Behaviour:

- Public-key authentication only, against the keys file (see authkeys);
  the SSH user name is logged, never used for authorisation.  Passwords,
  keyboard-interactive and host-based authentication are not offered.
  After ``max_auth_attempts`` refused keys the connection is dropped.
- Per connection: an exec request is answered by answers.respond (one
  snapshot read per answer; ``set`` judged against the authenticated key's
  instance name), a shell request without a PTY gets the legacy text (what
  the tcpsecrets-era MITIGATOR expects), then the channel closes with the
  answer's exit status.
- Anycast (anycast.py): off unless ``anycast_instances`` names key
  instances; at start, before listening, a stored set the module lacks is
  replayed (and again before any answer whenever the module shows none).  PTYs, subsystems (sftp), env requests,
  port/agent/X11 forwarding are refused and logged.
- Limits: ``login_timeout`` seconds to authenticate; at most
  ``max_unauthenticated`` connections that have not authenticated yet, and
  ``max_unauthenticated_per_source`` of them from one address (so a single
  host cannot take every slot and lock MITIGATOR out); a
  token bucket per source address (``rate`` per second, ``burst``); at most
  ``max_sessions`` sessions open at once per connection.
- Logs (stdout, one line per event): each bound address
  (``listening on ADDR:PORT``), each poll (instance, source, user, command,
  exit status, result, duration) and each refusal with its reason.
  Answers are never logged, so secrets never reach the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import asyncssh
from asyncssh.packet import SSHPacket

from . import __version__, logs
from .answers import HostFacts, loggable_command, respond
from .anycast import DEFAULT_STATE_DIR, Anycast
from .authkeys import DEFAULT_KEYS_PATH, KeyEntry, KeysFile
from .clock import kernel_clock_synced
from .hostkey import DEFAULT_HOST_KEY_PATH
from .ratelimit import SourceRateLimiter
from .snapshot import DEFAULT_DEVICE

DEFAULT_PORT = 7100
SERVER_VERSION = "mitigator_agent"  # the SSH banner's software field
EXIT_INTERNAL_ERROR = 4


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``serve`` can be told; defaults suit a handful of pollers every few seconds."""

    port: int = DEFAULT_PORT
    listen: Tuple[str, ...] = ()  # empty: every address, IPv4 and IPv6
    keys_path: str = DEFAULT_KEYS_PATH
    host_key_path: str = DEFAULT_HOST_KEY_PATH
    device: str = DEFAULT_DEVICE
    login_timeout: float = 10.0
    max_unauthenticated: int = 16
    max_unauthenticated_per_source: int = 4
    rate: float = 2.0  # connections per second per source address, sustained
    burst: int = 20    # connections a source may open at once
    max_auth_attempts: int = 6
    max_sessions: int = 4
    anycast_instances: Tuple[str, ...] = ()  # key instances allowed to `set`; empty: set disabled
    state_dir: str = DEFAULT_STATE_DIR       # where the last accepted set is stored


def plain_address(host: str) -> str:
    """The client address as the keys file's from= and the logs mean it.

    An IPv4 client on a dual-stack IPv6 socket shows up as ``::ffff:a.b.c.d``
    (asyncio's own listeners are IPv6-only, but nothing else guarantees
    that); from="a.b.c.0/24" and the rate limit must still see a.b.c.d.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def format_address(host: str, port: int) -> str:
    """``1.2.3.4:5`` or ``[::1]:5``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AgentServer:
    """Shared state of all connections: settings, keys file, limits."""

    def __init__(self, settings: ServerSettings, host_key: asyncssh.SSHKey,
                 keys: Optional[KeysFile] = None) -> None:
        self.settings = settings
        self.keys = keys or KeysFile(settings.keys_path)
        self.log = logs.get_logger()
        self._host_key = host_key
        self._limiter = SourceRateLimiter(settings.rate, settings.burst)
        self._unauthenticated: Counter[str] = Counter()  # per source address
        self._acceptors: List[asyncssh.SSHAcceptor] = []
        self.anycast = Anycast(settings.anycast_instances, settings.state_dir, settings.device, self.log)
        uname = os.uname()
        self._os_name, self._kernel_release = uname.sysname, uname.release

    def host_facts(self) -> HostFacts:
        """Facts for an answer, the clock state read fresh."""
        return HostFacts(self._os_name, self._kernel_release, __version__, kernel_clock_synced())

    def admit_connection(self, address: str) -> Optional[str]:
        """Count a new connection in; return why it is refused, or None."""
        if not self._limiter.allow(address):
            return (f"rate limit: over {self.settings.burst} connections from this address"
                    f" at {self.settings.rate:g}/s")
        total = sum(self._unauthenticated.values())
        if total >= self.settings.max_unauthenticated:
            return f"too many unauthenticated connections ({total})"
        if self._unauthenticated[address] >= self.settings.max_unauthenticated_per_source:
            return f"too many unauthenticated connections from this address ({self._unauthenticated[address]})"
        self._unauthenticated[address] += 1
        return None

    def release_unauthenticated(self, address: str) -> None:
        """A connection counted by admit_connection authenticated or went away."""
        self._unauthenticated[address] -= 1
        if not self._unauthenticated[address]:
            del self._unauthenticated[address]

    async def start(self) -> List[Tuple[str, int]]:
        """Listen on every configured address; return the bound (host, port) pairs."""
        self.keys.state()  # report keys-file problems at start, not at the first poll
        self.anycast.startup()  # a stored set goes back into the module before anyone is answered
        bound: List[Tuple[str, int]] = []
        try:
            for host in self.settings.listen or ("",):
                acceptor = await asyncssh.listen(
                    host,
                    self.settings.port,
                    server_factory=lambda: AgentConnection(self),
                    server_host_keys=[self._host_key],
                    server_version=SERVER_VERSION,
                    login_timeout=self.settings.login_timeout,
                    public_key_auth=True,
                    password_auth=False,
                    kbdint_auth=False,
                    gss_host=None,
                    # PTY requests reach AgentSession.pty_requested, which
                    # refuses and logs them; asyncssh's own refusal is silent.
                    allow_pty=True,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    allow_scp=False,
                )
                self._acceptors.append(acceptor)
                for sock in acceptor.sockets:
                    address = sock.getsockname()
                    bound.append((address[0], address[1]))
                    self.log.info(f"listening on {format_address(address[0], address[1])}")
        except BaseException:
            await self.close()
            raise
        return bound

    async def close(self) -> None:
        """Stop listening and wait for the listeners to go."""
        for acceptor in self._acceptors:
            acceptor.close()
        for acceptor in self._acceptors:
            await acceptor.wait_closed()
        self._acceptors.clear()


class AgentConnection(asyncssh.SSHServer):
    """One client connection: admission, authentication, refusals."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self._conn: Optional[asyncssh.SSHServerConnection] = None
        self.address = ""
        self.source = "?"
        self.user: Optional[str] = None
        self.entry: Optional[KeyEntry] = None
        self._counted = False
        self._authenticated = False
        self._auth_failures = 0
        self._login_refused = False  # the refusal was logged when it happened
        self._open_sessions = 0
        self._polls = 0

    # --- logging -----------------------------------------------------------

    def log_event(self, level: int, event: str, /, **fields: object) -> None:
        """Log an event carrying this connection's identity fields first."""
        identity = {
            "src": self.source,
            "user": self.user,
            "instance": (self.entry.instance or "-") if self.entry else None,
            "key": self.entry.fingerprint if self.entry else None,
        }
        self.server.log.log(level, logs.event(event, **identity, **fields))

    def refuse(self, request: str, /, **detail: object) -> None:
        """Log a refused request."""
        self.log_event(logging.WARNING, "refused", request=request, **detail)

    # --- connection --------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.address = plain_address(peer[0])
        self.source = format_address(self.address, peer[1])
        reason = self.server.admit_connection(self.address)
        if reason is not None:
            self.refuse("connection", reason=reason)
            conn.abort()
            return
        self._counted = True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self._counted:
            return
        if not self._authenticated:
            self.server.release_unauthenticated(self.address)
            if not self._login_refused:
                self.refuse("login", reason="closed before authenticating",
                            detail=str(exc) if exc else None)
        elif self._polls == 0:
            self.log_event(logging.INFO, "closed", reason="no command was run")

    # --- authentication ----------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.user = username
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        match = self.server.keys.match(key, self.address)
        if match.entry is not None:
            self.entry = match.entry
            return True
        self._auth_failures += 1
        self.refuse("publickey", offered=key.get_fingerprint("sha256"), reason=match.reason)
        if self._auth_failures >= self.server.settings.max_auth_attempts and self._conn:
            self.refuse("login", reason=f"{self._auth_failures} keys refused, disconnecting")
            self._login_refused = True
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                  "too many authentication failures")
        return False

    def auth_completed(self) -> None:
        self._authenticated = True
        self.server.release_unauthenticated(self.address)

    # --- channels ----------------------------------------------------------

    def session_requested(self) -> Union[bool, Tuple[asyncssh.SSHServerChannel, asyncssh.SSHServerSession]]:
        if self._open_sessions >= self.server.settings.max_sessions:
            self.refuse("session", reason=f"already {self._open_sessions} sessions open")
            return False
        assert self._conn is not None
        self._open_sessions += 1
        channel = RestrictedChannel.adopt(self._conn.create_server_channel(), self)
        return channel, AgentSession(self)

    def session_closed(self, polled: bool) -> None:
        """Bookkeeping when a session channel goes away."""
        self._open_sessions -= 1
        self._polls += int(polled)

    def connection_requested(self, dest_host: str, dest_port: int,
                             orig_host: str, orig_port: int) -> bool:
        self.refuse("port forwarding", to=format_address(dest_host, dest_port))
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.refuse("remote port forwarding", listen=format_address(listen_host, listen_port))
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.refuse("unix socket forwarding", to=dest_path)
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self.refuse("remote unix socket forwarding", listen=listen_path)
        return False


class RestrictedChannel(asyncssh.SSHServerChannel):
    """A session channel that refuses env/X11/agent requests and keeps bad commands.

    asyncssh has no public hook for these: it accepts every env request,
    answers X11/agent requests without telling the application, and drops
    an exec request whose command is not UTF-8 without a word.  These
    overrides use asyncssh's per-request handler names
    (``_process_<request>_request``); the integration tests pin the
    behaviour, so an asyncssh change that breaks them fails the suite.
    """

    connection: AgentConnection

    @classmethod
    def adopt(cls, channel: asyncssh.SSHServerChannel, connection: AgentConnection) -> "RestrictedChannel":
        """Turn a channel made by asyncssh's public factory into this class.

        The class adds behaviour only, no state of its own, so switching
        the class of a fresh channel is safe and avoids depending on the
        channel constructor's private arguments.
        """
        channel.__class__ = cls
        assert isinstance(channel, cls)
        channel.connection = connection
        return channel

    def _process_env_request(self, packet: SSHPacket) -> bool:
        name = packet.get_string()
        packet.get_string()  # the value is not logged: it could be anything
        packet.check_end()
        # INFO, not WARNING: stock OpenSSH clients send LANG on every poll.
        self.connection.log_event(logging.INFO, "refused", request="env",
                                  name=name.decode("utf-8", "backslashreplace"))
        return False

    def _process_x11_req_request(self, packet: SSHPacket) -> bool:
        self.connection.refuse("X11 forwarding")
        return False

    # asyncssh's version answers later (returns None); a refusal can answer at once.
    def _process_auth_agent_req_at_openssh_dot_com_request(  # type: ignore[override]
            self, packet: SSHPacket) -> bool:
        self.connection.refuse("agent forwarding")
        return False

    def _process_exec_request(self, packet: SSHPacket) -> bool:
        raw = packet.get_string()
        packet.check_end()
        # Undecodable bytes travel on as lone surrogates; answers.respond
        # turns them into a clear "not valid UTF-8" error.
        return self._start_session(command=raw.decode("utf-8", "surrogateescape"))


class AgentSession(asyncssh.SSHServerSession):
    """One SSH session: one command, one answer, then the channel closes."""

    def __init__(self, connection: AgentConnection) -> None:
        self._connection = connection
        self._channel: Optional[asyncssh.SSHServerChannel] = None
        self._command: Optional[str] = None
        self._requested_at = 0.0
        self._answered = False

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._channel = chan

    def pty_requested(self, term_type: str, term_size: Tuple[int, int, int, int],
                      term_modes: object) -> bool:
        self._connection.refuse("pty")
        return False

    def shell_requested(self) -> bool:
        self._requested_at = time.monotonic()
        return True  # answered with the legacy text, never an interactive shell

    def exec_requested(self, command: str) -> bool:
        self._requested_at = time.monotonic()
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._connection.refuse("subsystem", name=subsystem)
        return False

    def break_received(self, msec: int) -> bool:
        return False

    def session_started(self) -> None:
        assert self._channel is not None
        server = self._connection.server
        try:
            entry = self._connection.entry
            answer = respond(self._command, server.settings.device, server.host_facts,
                             server.anycast, entry.instance if entry else None)
            stdout, stderr, status, result = answer.stdout, answer.stderr, answer.exit_status, answer.result
        except Exception as exc:  # a bug must not take the server down
            stdout, stderr, status = "", "internal error\n", EXIT_INTERNAL_ERROR
            result = f"internal error: {type(exc).__name__}: {exc}"
        if stdout:
            self._channel.write(stdout)
        if stderr:
            self._channel.write_stderr(stderr)
        self._channel.exit(status)
        self._answered = True
        self._connection.log_event(
            logging.INFO if status == 0 else logging.WARNING,
            "poll",
            command=loggable_command(self._command),
            status=status,
            result=result,
            duration_ms=f"{(time.monotonic() - self._requested_at) * 1000:.1f}",
        )

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._connection.session_closed(self._answered)


async def run_until_signalled(settings: ServerSettings, host_key: asyncssh.SSHKey) -> None:
    """Serve until SIGTERM or SIGINT (also one that arrives while starting)."""
    server = AgentServer(settings, host_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before listening: once `listening on` is logged a supervisor may stop
    # us at once, and the default action would kill the process unclean.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    server.log.info(logs.event("stopping"))
    await server.close()
