"""The SSH server MITIGATOR polls (asyncssh).

Behaviour:

- Public-key authentication only, against the keys file (see authkeys);
  the SSH user name is logged, never used for authorisation.  Passwords,
  keyboard-interactive and host-based authentication are not offered.
  After ``max_auth_attempts`` refused keys the connection is dropped.  A
  key's instance name is logged only once its signature verified: a
  refused login never carries one.
- Crypto (the lists are explicit, nothing else is offered): key exchange
  curve25519-sha256, curve25519-sha256@libssh.org, then
  mlkem768x25519-sha256 where the installed asyncssh has it; host key and
  signatures ssh-ed25519 only; ciphers chacha20-poly1305@openssh.com,
  aes256-gcm@openssh.com, aes128-gcm@openssh.com (AEAD: no MAC is used);
  MACs hmac-sha2-256/512-etm only for clients that insist on one; no
  compression.  A client's first_kex_packet_follows guess is judged as
  RFC 4253 7.1 says (wrong unless both sides prefer the same kex and host
  key algorithm) and a wrong guess is discarded: asyncssh judges it by the
  negotiated algorithm alone, which breaks Dropbear's dbclient whenever
  our first kex is not its first (KexGuessServerConnection).
- Per connection: an exec request is answered by answers.respond (one
  snapshot read per answer; ``set`` judged against the authenticated key's
  instance name), a shell request without a PTY gets the legacy text (what
  the tcpsecrets-era MITIGATOR expects), then the channel closes with the
  answer's exit status.  Only known commands are logged whole; of any other
  only a verb matching ``^[a-z-]{1,16}$`` is, else ``(unprintable verb)``.
- Anycast (anycast.py): off unless ``anycast_instances`` names key
  instances; at start, before listening, a stored set the module lacks is
  replayed (and again before any answer whenever the module shows none).  PTYs, subsystems (sftp),
  port/agent/X11 forwarding are refused and logged.  Env requests (stock
  OpenSSH clients send ``LANG``) are ignored, logged at debug level only.
- Admission before authentication (ratelimit.Admission): sources the keys
  file names in from= patterns, those in ``allow`` (CIDRs), and those that
  authenticated before with a listed key (knownsources.py), have
  ``max_unauthenticated_allowed`` slots strangers cannot take; strangers
  share ``max_unauthenticated``, at most ``max_unauthenticated_per_source``
  per IPv4 address or IPv6 /48, pass a token bucket per such source
  (``rate``/``burst``) and are refused for a growing time after their
  connections time out or fail authentication (penalties, as OpenSSH's
  PerSourcePenalties).  With ``strict_allow`` a connection from anyone else
  is dropped before the SSH banner.  ``login_timeout`` seconds to
  authenticate; at most ``max_sessions`` sessions open at once per
  connection; an authenticated connection with no session open for
  ``idle_timeout`` seconds is closed (``ssh -N``, a forgotten master).
- Daemon: SIGTERM/SIGINT stop; SIGHUP re-reads the keys file and the
  config file (values given on the command line keep winning) and logs
  ``reloaded``; core dumps are off (RLIMIT_CORE 0, PR_SET_DUMPABLE 0) before
  any secret is read.
- Listen addresses: ``ADDR``, ``[ADDR]``, ``ADDR:PORT`` or ``[ADDR]:PORT``
  (IP addresses, as sshd's ListenAddress); without a port, ``port``.
- The last answered command per key instance goes to the runtime state
  (runstate.py) for ``status``.
- ``mitigator-agent check`` probes the port with its own SSH banner
  (``CHECK_PROBE_VERSION``); such a probe from this host's own address is
  logged at debug level and never penalised.
- Logs (stdout, one line per event; see logs.py): each bound address
  (``listening on ADDR:PORT``), each poll (instance, source, user, command,
  exit status, result, duration) and each refusal with its reason, at
  most ``logs.AGGREGATE_LINES_PER_WINDOW`` refusal lines per source in 60 s,
  then ``... and N more from SRC in 60 s``.  Answers are never logged, so
  secrets never reach the log.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import inspect
import ipaddress
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import asyncssh
from asyncssh.constants import MSG_KEXINIT, MSG_SERVICE_ACCEPT, MSG_SERVICE_REQUEST
from asyncssh.kex import get_kex_algs
from asyncssh.packet import SSHPacket, String

from . import __version__, activation, logs
from .answers import PROTOCOL_LEVEL, HostFacts, loggable_command, respond
from .anycast import DEFAULT_STATE_DIR, Anycast
from .authkeys import DEFAULT_KEYS_PATH, KeyEntry, KeysFile
from .clock import kernel_clock_synced, libc
from .hostkey import DEFAULT_HOST_KEY_PATH
from .knownsources import KnownSources
from .ratelimit import Admission, Ticket, source_bucket
from .runstate import DEFAULT_RUNTIME_DIR, PollRecorder
from .snapshot import DEFAULT_DEVICE

DEFAULT_PORT = 7100
SERVER_VERSION = "mitigator_agent"  # the SSH banner's software field
CHECK_PROBE_VERSION = "SSH-2.0-mitigator_agent_check"  # the banner `check` sends before it hangs up
EXIT_INTERNAL_ERROR = 4

# --- crypto posture ---------------------------------------------------------------

_PQ_KEX = "mlkem768x25519-sha256"
KEX_ALGS: Tuple[str, ...] = ("curve25519-sha256", "curve25519-sha256@libssh.org") + (
    (_PQ_KEX,) if _PQ_KEX.encode() in get_kex_algs() else ())
HOST_KEY_ALG = "ssh-ed25519"
SIGNATURE_ALGS: Tuple[str, ...] = (HOST_KEY_ALG,)
ENCRYPTION_ALGS: Tuple[str, ...] = ("chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com",
                                    "aes128-gcm@openssh.com")
MAC_ALGS: Tuple[str, ...] = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
COMPRESSION_ALGS: Tuple[str, ...] = ("none",)

FLUSH_INTERVAL_SECONDS = 5.0   # how often refusal summaries are written
DRAIN_SECONDS = 10.0           # at a stop, how long polls under way may take to finish
ACCEPT_SETTLE_SECONDS = 0.2    # at a stop, for connections accepted in the last instant to be set up
STOP_IDLE_SECONDS = 2.0        # at a stop, a connection authenticated this long with no session is closed
ALLOWED_CACHE_SECONDS = 1.0    # admission re-reads the keys file at least this often (besides on stat changes)

PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``serve`` can be told; defaults suit a handful of pollers every few seconds."""

    port: int = DEFAULT_PORT
    listen: Tuple[str, ...] = ()  # empty: every address, IPv4 and IPv6
    keys_path: str = DEFAULT_KEYS_PATH
    host_key_path: str = DEFAULT_HOST_KEY_PATH
    device: str = DEFAULT_DEVICE
    login_timeout: float = 10.0
    idle_timeout: float = 300.0  # an authenticated connection with no session open this long is closed; 0: never
    max_unauthenticated: int = 16             # strangers, all together
    max_unauthenticated_per_source: int = 4   # strangers, per IPv4 address or IPv6 /48
    max_unauthenticated_allowed: int = 16     # allowed sources' own pool
    rate: float = 2.0  # connections per second per source address, sustained
    burst: int = 20    # connections a source may open at once
    max_auth_attempts: int = 6
    max_sessions: int = 4
    protocol: str = PROTOCOL_LEVEL           # the isn_sync release whose `get` is answered
    anycast_instances: Tuple[str, ...] = ()  # key instances allowed to `set`; empty: set disabled
    state_dir: str = DEFAULT_STATE_DIR       # where the last accepted set is stored
    allow: Tuple[str, ...] = ()              # CIDRs with admission of their own (besides from=)
    strict_allow: bool = False               # drop everyone else before the banner
    runtime_dir: str = DEFAULT_RUNTIME_DIR   # the last poll per instance (runstate.py)
    kex_algs: Tuple[str, ...] = KEX_ALGS     # tests reorder it; not a flag


# Settings that only a restart can change (the listeners and the host key).
RESTART_ONLY = ("port", "listen", "host_key_path")


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


LISTEN_FORMS = "ADDR, [ADDR], ADDR:PORT or [ADDR]:PORT, e.g. 192.0.2.10 or [2001:db8::10]:7100"


def split_listen_address(text: str) -> Tuple[str, Optional[int]]:
    """Parse a listen address as sshd's ListenAddress: (IP address, port or None).

    ``ADDR``, ``[ADDR]``, ``ADDR:PORT`` or ``[ADDR]:PORT``; a bare IPv6
    address is an address (``2001:db8::7100`` has no port: write
    ``[2001:db8::]:7100``).  Raises ValueError with a one-line reason.
    """
    spec = text.strip()
    port_text: Optional[str] = None
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not an address; give {LISTEN_FORMS}")
        port_text = rest[1:] if rest else None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:
        host = spec
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address; give {LISTEN_FORMS}") from None
    port: Optional[int] = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
        port = int(port_text)
    return str(address), port


class ListenError(Exception):
    """An address could not be bound; the message names it and the fix."""


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """One line for a failed bind: the address, the reason in words, what to do."""
    where = format_address(host or "*", port)
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: another program has that port"
                f" (ss -ltnp 'sport = :{port}' shows which); stop it or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this host (ip -br addr shows them)"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: ports below 1024 need privilege; use {DEFAULT_PORT}"
    return f"cannot listen on {where}: {(exc.strerror or str(exc)).lower()}"


def listen_endpoints(settings: "ServerSettings") -> List[Tuple[str, int]]:
    """(host, port) pairs to bind: each listen address with its own port or ``port``; "" = every address."""
    if not settings.listen:
        return [("", settings.port)]
    endpoints = []
    for text in settings.listen:
        host, port = split_listen_address(text)
        endpoints.append((host, settings.port if port is None else port))
    return endpoints


def disable_core_dumps() -> Optional[str]:
    """RLIMIT_CORE 0 and PR_SET_DUMPABLE 0: no core file, no ptrace by our own uid.

    A core dump of this process would hold the secrets it served.  Returns
    why it could not be done, or None.
    """
    problems = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        problems.append(f"RLIMIT_CORE: {exc}")
    if libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"prctl(PR_SET_DUMPABLE): {os.strerror(ctypes.get_errno())}")
    return "; ".join(problems) or None


def first_kex_guess_is_wrong(client_kexinit: bytes, server_kex_algs: Sequence[bytes],
                             server_host_key_algs: Sequence[bytes]) -> bool:
    """RFC 4253 7.1: a client's guessed kex packet is wrong unless both sides prefer the same algorithms.

    ``client_kexinit`` is the client's whole KEXINIT payload (message byte
    included).  The guess is right only when the first kex algorithm and
    the first host key algorithm of the client's lists are also the first
    of ours ("server and client have different preferred algorithm" makes
    it wrong).  Dropbear judges its own guess exactly so, and re-sends its
    KEXDH_INIT when it was wrong; accepting the guess anyway, as asyncssh
    does whenever the negotiated algorithm is the client's first, leaves
    the re-sent packet to arrive after the exchange ("Key exchange not in
    progress").
    """
    packet = SSHPacket(client_kexinit)
    packet.get_byte()
    packet.get_bytes(16)
    client_kex = packet.get_namelist()
    client_host_key = packet.get_namelist()
    for _ in range(8):
        packet.get_namelist()
    if not packet.get_boolean():
        return False
    return (not client_kex or not server_kex_algs or client_kex[0] != server_kex_algs[0]
            or not client_host_key or not server_host_key_algs
            or client_host_key[0] != server_host_key_algs[0])


USERAUTH_SERVICE = b"ssh-userauth"


class KexGuessServerConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection with two fixes for real clients.

    - RFC 4253's rule for a wrong first-kex guess.  asyncssh buffers
      further packets until an async handler finishes, so the guessed
      packet is judged with the corrected flag.
    - A repeated request for the ``ssh-userauth`` service while
      authentication is under way is accepted again, as OpenSSH's sshd
      does.  paramiko sends one before each key it tries; asyncssh took the
      second as a protocol error and disconnected, so a client offering an
      unlisted key before its listed one never got in.

    Installed on each connection by AgentConnection.connection_made (class
    switch, as RestrictedChannel.adopt: no state of its own).
    """

    async def _process_kexinit_rfc(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        result = asyncssh.SSHServerConnection._process_kexinit(  # type: ignore[attr-defined]
            self, pkttype, pktid, packet)
        # A coroutine in current asyncssh, a plain method in some older
        # releases the dependency floor admits.
        if inspect.isawaitable(result):
            await result
        self._ignore_first_kex = first_kex_guess_is_wrong(
            self._client_kexinit, self._kex_algs, self._server_host_key_algs or [])  # type: ignore[attr-defined]

    def _process_service_request_again(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        if (packet.get_remaining_payload() == String(USERAUTH_SERVICE)
                and self._auth_in_progress and not self._auth_complete):  # type: ignore[attr-defined]
            self.send_packet(MSG_SERVICE_ACCEPT, String(USERAUTH_SERVICE))
            return
        asyncssh.SSHServerConnection._process_service_request(  # type: ignore[attr-defined]
            self, pkttype, pktid, packet)

    _packet_handlers = {**asyncssh.SSHServerConnection._packet_handlers,  # type: ignore[attr-defined]
                        MSG_KEXINIT: _process_kexinit_rfc,
                        MSG_SERVICE_REQUEST: _process_service_request_again}


class AgentServer:
    """Shared state of all connections: settings, keys file, admission, logging."""

    def __init__(self, settings: ServerSettings, host_key: asyncssh.SSHKey,
                 keys: Optional[KeysFile] = None, listeners: Sequence[socket.socket] = ()) -> None:
        """`listeners`: sockets systemd passed (activation.py), served instead of binding the configured addresses."""
        self.settings = settings
        self.keys = keys or KeysFile(settings.keys_path)
        self.log = logs.get_logger()
        self._host_key = host_key
        self._allow_networks = self._networks(settings.allow)
        self.admission = Admission(settings.max_unauthenticated, settings.max_unauthenticated_per_source,
                                   settings.max_unauthenticated_allowed, settings.rate, settings.burst,
                                   self.is_allowed)
        self.refusals = logs.RefusalAggregator()
        self.polls = PollRecorder(settings.runtime_dir, self.log)
        self._listed: Tuple[KeyEntry, ...] = ()  # the keys file's entries, as admission last read them
        self._listed_usable = False              # False while the keys file admits nobody
        self.known_sources = KnownSources(settings.state_dir, self.log)
        self._allowed_checked = float("-inf")
        self._allowed_identity: Optional[Tuple[int, int, int, int, int]] = None
        self._acceptors: List[asyncssh.SSHAcceptor] = []
        self._inherited = tuple(listeners)
        self._live: Set["AgentConnection"] = set()  # every connection not yet lost
        self._flusher: Optional["asyncio.Task[None]"] = None
        self.anycast = Anycast(settings.anycast_instances, settings.state_dir, settings.device, self.log)
        uname = os.uname()
        self._os_name, self._kernel_release = uname.sysname, uname.release

    @staticmethod
    def _networks(cidrs: Sequence[str]) -> Tuple[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def host_facts(self) -> HostFacts:
        """Facts for an answer, the clock state read fresh."""
        return HostFacts(self._os_name, self._kernel_release, __version__, kernel_clock_synced())

    # --- admission ---------------------------------------------------------

    def is_allowed(self, address: str) -> bool:
        """Whether ``address`` is one of MITIGATOR's, for admission before authentication.

        It is when it is in ``allow``; when a key's from= names it (only
        keys whose from= names particular sources count,
        frompatterns.names_particular_sources: a key without from=, or with
        a pattern such as ``*``, names nobody); or when it is a known source
        (knownsources.py): it authenticated before with a key that is still
        listed and still admits it.  While the keys file admits nobody (its
        mode, say), every known source stays one: the file's fault must not
        turn MITIGATOR into a stranger.  For this the keys file is re-read
        only when its stat identity changed or ALLOWED_CACHE_SECONDS passed,
        so a flood of connections does not re-read it for each;
        authentication itself always reads it fresh.
        """
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if any(ip in network for network in self._allow_networks):
            return True
        now = time.monotonic()
        identity = self._keys_identity()
        if identity != self._allowed_identity or now - self._allowed_checked >= ALLOWED_CACHE_SECONDS:
            state = self.keys.state()
            self._listed, self._listed_usable = state.entries, state.refusal is None
            self._allowed_checked, self._allowed_identity = now, identity
        if any(entry.names_sources and entry.admits(entry.key, address) for entry in self._listed):
            return True
        known_keys = self.known_sources.keys_of(address)
        if not known_keys:
            return False
        if not self._listed_usable:
            return True
        return any(entry.fingerprint in known_keys and entry.admits(entry.key, address) for entry in self._listed)

    def _keys_identity(self) -> Optional[Tuple[int, int, int, int, int]]:
        """What changes whenever the keys file is replaced or written (ctime included)."""
        try:
            st = os.lstat(self.keys.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def note_refusal(self, bucket: str) -> bool:
        """Count a refusal of ``bucket``; True if it may have a log line of its own."""
        own_line, summary = self.refusals.note(bucket)
        if summary:
            self.log.warning(logs.event("refused", summary=summary))
        return own_line

    async def _flush_refusals(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            for summary in self.refusals.flush():
                self.log.warning(logs.event("refused", summary=summary))

    # --- settings ----------------------------------------------------------

    def apply_settings(self, new: ServerSettings) -> List[str]:
        """Take over reloaded settings; return the names of the settings that changed.

        Limits, allow list, keys path and anycast apply at once (connections
        already admitted keep their slots); ``RESTART_ONLY`` settings are
        logged as needing a restart and otherwise ignored.  Everything that
        can fail is built before anything is changed, so a failure leaves
        the previous settings whole.
        """
        changed = [f.name for f in dataclasses.fields(ServerSettings)
                   if getattr(new, f.name) != getattr(self.settings, f.name)]
        restart = [name for name in changed if name in RESTART_ONLY]
        if restart:
            self.log.warning(logs.event("reload-needs-restart", settings=",".join(restart)))
            new = dataclasses.replace(new, **{name: getattr(self.settings, name) for name in restart})
        networks = self._networks(new.allow)
        keys = KeysFile(new.keys_path) if new.keys_path != self.settings.keys_path else self.keys
        known_sources = self.known_sources
        if new.state_dir != self.settings.state_dir:
            known_sources = KnownSources(new.state_dir, self.log)
            known_sources.load()  # logs its problems instead of raising
        anycast = self.anycast
        if (new.anycast_instances, new.state_dir, new.device) != (
                self.settings.anycast_instances, self.settings.state_dir, self.settings.device):
            anycast = Anycast(new.anycast_instances, new.state_dir, new.device, self.log)
        # From here on nothing raises.
        self._allow_networks = networks
        self.admission.stranger_slots = new.max_unauthenticated
        self.admission.per_source = new.max_unauthenticated_per_source
        self.admission.allowed_slots = new.max_unauthenticated_allowed
        self.admission.limiter.rate, self.admission.limiter.burst = new.rate, new.burst
        self.keys = keys
        self.known_sources = known_sources
        if anycast is not self.anycast:
            self.anycast = anycast
            anycast.startup()  # logs its problems instead of raising, as at start
        self.settings = new
        self._allowed_checked = float("-inf")
        return changed

    def reload(self, load_settings: Optional[Callable[[ServerSettings], ServerSettings]]) -> None:
        """SIGHUP: re-read the config (via ``load_settings``) and the keys file; log what happened.

        Logs ``reloaded keys=N config=reloaded|failed|not-used changed=NAMES``;
        a config that cannot be used is logged as ``reload-failed`` and the
        previous settings stay in force.  Never raises: a signal must not
        stop a running agent.
        """
        changed: List[str] = []
        config = "not-used"
        if load_settings is not None:
            try:
                changed = self.apply_settings(load_settings(self.settings))
                config = "reloaded"
            except Exception as exc:  # a bad config must not stop a running agent
                self.log.error(logs.event("reload-failed", reason=str(exc), kept="previous settings"))
                config = "failed"
        self.keys.forget()
        self._allowed_checked = float("-inf")
        state = self.keys.state()
        self.log.info(logs.event("reloaded", keys=len(state.entries), config=config,
                                 changed=",".join(changed) or "nothing"))

    # --- listening ---------------------------------------------------------

    def listen_options(self) -> dict:
        """asyncssh.listen keyword arguments besides host, port and factory."""
        settings = self.settings
        return dict(
            server_host_keys=[self._host_key],
            server_version=SERVER_VERSION,
            login_timeout=settings.login_timeout,
            public_key_auth=True,
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            kex_algs=list(settings.kex_algs),
            encryption_algs=list(ENCRYPTION_ALGS),
            mac_algs=list(MAC_ALGS),
            compression_algs=list(COMPRESSION_ALGS),
            signature_algs=list(SIGNATURE_ALGS),
            # PTY requests reach AgentSession.pty_requested, which
            # refuses and logs them; asyncssh's own refusal is silent.
            allow_pty=True,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
        )

    async def start(self) -> List[Tuple[str, int]]:
        """Listen on every configured address; return the bound (host, port) pairs."""
        self.keys.state()  # report keys-file problems at start, not at the first poll
        self.known_sources.load()
        self.anycast.startup()  # a stored set goes back into the module before anyone is answered
        if self.settings.strict_allow and not self.settings.allow:
            self.log.warning(logs.event("strict-allow", note="no --allow given: only sources named by"
                                                             " keys-file from= patterns get in"))
        bound: List[Tuple[str, int]] = []
        try:
            if self._inherited:
                await self._serve_inherited()
            else:
                for host, port in listen_endpoints(self.settings):
                    try:
                        acceptor = await asyncssh.listen(
                            host, port, server_factory=lambda: AgentConnection(self),
                            **self.listen_options())
                    except OSError as exc:
                        raise ListenError(listen_problem(host, port, exc)) from None
                    self._acceptors.append(acceptor)
            origin = " (from systemd)" if self._inherited else ""
            for acceptor in self._acceptors:
                for sock in acceptor.sockets:
                    address = sock.getsockname()
                    bound.append((address[0], address[1]))
                    self.log.info(f"listening on {format_address(address[0], address[1])}{origin}")
        except BaseException:
            await self.close()
            raise
        self._flusher = asyncio.get_running_loop().create_task(self._flush_refusals())
        return bound

    async def _serve_inherited(self) -> None:
        """Accept on the sockets systemd passed, once they are where the configuration listens."""
        problem = activation.endpoint_problem(self._inherited, listen_endpoints(self.settings))
        if problem is not None:
            raise activation.ActivationError(problem)
        for sock in self._inherited:
            self._acceptors.append(await asyncssh.listen(
                sock=sock, server_factory=lambda: AgentConnection(self), **self.listen_options()))

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Stop listening, let open connections finish, write pending refusal summaries, wait for the listeners.

        For up to `drain_seconds` the connections already accepted go on (a poll
        under way is answered); one authenticated for STOP_IDLE_SECONDS with no
        session open is closed, as nothing is under way on it. Connections
        queued on systemd's socket meanwhile wait for the next agent.
        """
        if drain_seconds > 0:
            self._stop_accepting()
            await self._drain(drain_seconds)
        for acceptor in self._acceptors:
            acceptor.close()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        for summary in self.refusals.flush(force=True):
            self.log.warning(logs.event("refused", summary=summary))
        self.known_sources.flush()
        for acceptor in self._acceptors:
            await acceptor.wait_closed()
        self._acceptors.clear()

    def _stop_accepting(self) -> None:
        """Accept no more connections, keeping the listeners open for those accepted already.

        asyncio accepts in one loop turn and sets the connection up in a task of the next; a
        listener closed in between makes that setup fail, and the connection is dropped with the
        client's first bytes unread (a reset). So a stop first takes the listening sockets out of
        the loop's watch (new connections wait in the kernel's queue, for the next agent when
        systemd holds the socket) and closes the listeners only after the drain.
        """
        loop = asyncio.get_running_loop()
        for acceptor in self._acceptors:
            for sock in acceptor.sockets or ():
                loop.remove_reader(sock.fileno())

    def track(self, connection: "AgentConnection") -> None:
        """A connection was accepted: a stop waits for it (close)."""
        self._live.add(connection)

    def untrack(self, connection: "AgentConnection") -> None:
        """A connection is gone."""
        self._live.discard(connection)

    async def _drain(self, seconds: float) -> None:
        """Wait until no connection is left, for at most `seconds`; then close what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # A connection the listener accepted just before it closed reaches connection_made a few
        # loop turns later (asyncio accepts, then sets the connection up in a task of its own):
        # that time is given first, so it is drained rather than cut when the process exits.
        await asyncio.sleep(ACCEPT_SETTLE_SECONDS)
        while self._live and loop.time() < deadline:
            for connection in list(self._live):
                connection.close_if_idle(STOP_IDLE_SECONDS)
            await asyncio.sleep(0.05)
        if self._live:
            self.log.warning(logs.event("stopping", open_connections=len(self._live),
                                        note=f"still open after {seconds:g} s: closed"))
            for connection in list(self._live):
                connection.abort()


class AgentConnection(asyncssh.SSHServer):
    """One client connection: admission, authentication, refusals, penalties."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self._conn: Optional[asyncssh.SSHServerConnection] = None
        self.address = ""
        self.source = "?"
        self.local_address = ""
        self.user: Optional[str] = None
        self.entry: Optional[KeyEntry] = None      # set only once authentication succeeded
        self._candidate: Optional[KeyEntry] = None  # the listed key offered, signature not yet checked
        self._ticket: Optional[Ticket] = None
        self._authenticated = False
        self._auth_failures = 0
        self._file_refusals = 0  # of those, refused because the keys file admits nobody
        self._login_refused = False  # the refusal was logged when it happened
        self._open_sessions = 0
        self._polls = 0
        self._idle_timer: Optional[asyncio.TimerHandle] = None
        self._idle_since: Optional[float] = None  # loop time since when it is authenticated with no session open

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
        """Log a refused request (bounded per source: see logs.RefusalAggregator)."""
        if self.server.note_refusal(source_bucket(self.address)):
            self.log_event(logging.WARNING, "refused", request=request, **detail)

    # --- connection --------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        conn.__class__ = KexGuessServerConnection
        self._conn = conn
        self.server.track(self)
        peer = conn.get_extra_info("peername")
        self.address = plain_address(peer[0])
        self.source = format_address(self.address, peer[1])
        sockname = conn.get_extra_info("sockname")
        self.local_address = plain_address(sockname[0]) if sockname else ""
        if self.server.settings.strict_allow and not self.server.is_allowed(self.address):
            self.refuse("connection", reason="not in the allow list (strict-allow)")
            conn.abort()  # before asyncssh sends its banner
            return
        ticket = self.server.admission.admit(self.address)
        if isinstance(ticket, str):
            self.refuse("connection", reason=ticket)
            conn.abort()
            return
        self._ticket = ticket

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.untrack(self)
        self._stop_idle_timer()
        if self._ticket is None:
            return
        if not self._authenticated:
            self.server.admission.release(self._ticket)
            if self._is_check_probe():
                self.log_event(logging.DEBUG, "check-probe")
                return
            detail = str(exc) if exc else None
            if detail == "Login timeout expired":
                offence = "grace_exceeded"
            elif self._auth_failures > self._file_refusals:
                offence = "authfail"
            elif self._auth_failures:
                # Every key it offered was refused because the keys file admits nobody: the file's
                # fault (logged as keys-file-admits-nobody), not this source's.
                offence = ""
            else:
                offence = "noauth"
            left, activated = self.server.admission.penalise(self._ticket, offence) if offence else (0.0, False)
            if not self._login_refused:
                self.refuse("login", reason="closed before authenticating", detail=detail)
            if activated:
                self.server.log.warning(logs.event(
                    "source-penalised", src=self._ticket.bucket, offence=offence.replace("_", "-"),
                    penalty_s=f"{left:.0f}",
                    refused_s=f"{left - self.server.admission.penalties.settings.min_seconds:.0f}"))
        elif self._polls == 0:
            self.log_event(logging.INFO, "closed", reason="no command was run")

    def _is_check_probe(self) -> bool:
        """`mitigator-agent check` on this host: its banner, from one of this host's addresses.

        A connection from this host to itself has the same address at both
        ends; a stranger sending the same banner from elsewhere is judged
        as any other client.
        """
        if self._conn is None or self._auth_failures:
            return False
        version = self._conn.get_extra_info("client_version")
        return version == CHECK_PROBE_VERSION and self.address == self.local_address

    # --- authentication ----------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.user = username
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        match = self.server.keys.match(key, self.address)
        if match.entry is not None:
            # Not yet self.entry: asyncssh checks the signature after this,
            # and a refusal must not name an instance it never proved.
            self._candidate = match.entry
            return True
        self._auth_failures += 1
        self._file_refusals += int(match.file_refused)
        self.refuse("publickey", offered=key.get_fingerprint("sha256"), reason=match.reason)
        if self._auth_failures >= self.server.settings.max_auth_attempts and self._conn:
            self.refuse("login", reason=f"{self._auth_failures} keys refused, disconnecting")
            self._login_refused = True
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                  "too many authentication failures")
        return False

    def auth_completed(self) -> None:
        self._authenticated = True
        self.entry = self._candidate
        if self._ticket is not None:
            self.server.admission.release(self._ticket)
        if self.entry is not None:
            self.server.known_sources.remember(self.address, self.entry.fingerprint, self.entry.instance)
        self._start_idle_timer()

    # --- idle authenticated connections ------------------------------------

    def _start_idle_timer(self) -> None:
        """Close the connection if no session is opened within ``idle_timeout`` (``ssh -N``, a stale master)."""
        self._idle_since = asyncio.get_running_loop().time()
        timeout = self.server.settings.idle_timeout
        if timeout > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._close_idle, timeout)

    def _stop_idle_timer(self) -> None:
        self._idle_since = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _close_idle(self, timeout: float) -> None:
        self._idle_timer = None
        if self._conn is not None and self._open_sessions == 0:
            self.log_event(logging.INFO, "closed", reason=f"idle for {timeout:g} s with no session open")
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, "idle timeout")

    def close_if_idle(self, seconds: float) -> None:
        """Close the connection if it has been authenticated with no session open for `seconds` (a stop).

        Just authenticated is not idle: a poll opens its session right after.
        """
        if (self._conn is not None and self._idle_since is not None and self._open_sessions == 0
                and asyncio.get_running_loop().time() - self._idle_since >= seconds):
            self._stop_idle_timer()
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, "agent stopping")

    def abort(self) -> None:
        """Drop the connection at once (the agent is stopping and it did not finish in time)."""
        if self._conn is not None:
            self._conn.abort()

    # --- channels ----------------------------------------------------------

    def session_requested(self) -> Union[bool, Tuple[asyncssh.SSHServerChannel, asyncssh.SSHServerSession]]:
        if self._open_sessions >= self.server.settings.max_sessions:
            self.refuse("session", reason=f"already {self._open_sessions} sessions open")
            return False
        assert self._conn is not None
        self._open_sessions += 1
        self._stop_idle_timer()
        channel = RestrictedChannel.adopt(self._conn.create_server_channel(), self)
        return channel, AgentSession(self)

    def session_closed(self, polled: bool) -> None:
        """Bookkeeping when a session channel goes away."""
        self._open_sessions -= 1
        self._polls += int(polled)
        if self._open_sessions == 0 and self._authenticated:
            self._stop_idle_timer()
            self._start_idle_timer()

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
        # Debug only: stock OpenSSH clients send LANG on every poll, and
        # ignoring it changes nothing (no command reads the environment).
        self.connection.log_event(logging.DEBUG, "env-ignored", name=name.decode("utf-8", "backslashreplace"))
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
                             server.anycast, entry.instance if entry else None, server.settings.protocol)
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
        connection = self._connection
        connection.server.polls.record(
            (entry.instance or "-") if entry else "-", connection.address,
            entry.fingerprint if entry else "?", loggable_command(self._command), status, result)
        connection.log_event(
            logging.INFO if status == 0 else logging.WARNING,
            "poll",
            command=loggable_command(self._command),
            status=status,
            result=result,
            duration_ms=f"{(time.monotonic() - self._requested_at) * 1000:.1f}",
        )

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._connection.session_closed(self._answered)


def settings_from_click() -> Optional[Callable[[ServerSettings], ServerSettings]]:
    """How SIGHUP re-reads the config when running under ``mitigator-agent serve``.

    The serve command's parameters are named as ServerSettings fields, so
    config.reload_params gives the new values directly; None outside click.
    """
    import click

    from .config import reload_params

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    names = {f.name for f in dataclasses.fields(ServerSettings)}

    def load(current: ServerSettings) -> ServerSettings:
        params = reload_params(ctx)
        return dataclasses.replace(current, **{k: v for k, v in params.items() if k in names})

    return load


async def run_until_signalled(settings: ServerSettings, host_key: asyncssh.SSHKey,
                              load_settings: Optional[Callable[[ServerSettings], ServerSettings]] = None,
                              listeners: Sequence[socket.socket] = ()) -> None:
    """Serve until SIGTERM or SIGINT (also one that arrives while starting); SIGHUP reloads.

    ``load_settings`` re-reads the configuration on SIGHUP (default: the
    serve command's config file through click's context, if any).
    ``listeners``: the sockets systemd passed (activation.inherited_listeners).
    On the signal, the agent stops accepting and gives the connections it
    has DRAIN_SECONDS to finish their polls. The caller disables core dumps
    first (disable_core_dumps), before the host key or any secret is in memory.
    """
    server = AgentServer(settings, host_key, listeners=listeners)
    if load_settings is None:
        load_settings = settings_from_click()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before listening: once `listening on` is logged a supervisor may stop
    # us at once, and the default action would kill the process unclean.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload, load_settings)
    await server.start()
    await stop.wait()
    server.log.info(logs.event("stopping"))
    await server.close(drain_seconds=DRAIN_SECONDS)
