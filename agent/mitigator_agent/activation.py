"""Listening sockets handed over by systemd (socket activation, as sd_listen_fds(3) describes it).

With ``mitigator-agent.socket`` systemd owns the listening socket and keeps it open while the
service restarts (an update, a crash): a poll that arrives meanwhile waits in the kernel's accept
queue for the next agent instead of being refused. systemd tells the agent which descriptors are
its sockets through the environment: ``LISTEN_PID`` (the agent's own pid) and ``LISTEN_FDS`` (how
many, numbered from 3).

The sockets must be where the agent's configuration says it listens (``listen``, ``port``): the
agent refuses to serve on an address nobody configured, and says which side to change.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import List, MutableMapping, Optional, Sequence, Tuple

FIRST_FD = 3  # SD_LISTEN_FDS_START
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
SOCKET_UNIT = "mitigator-agent.socket"

Endpoint = Tuple[str, int]  # (IP address, or "" for every address; port)


@dataclass(frozen=True)
class ActivationProblem:
    """Why the sockets systemd passed cannot be served: a kind, the descriptor, a sentence, a remedy.

    Kinds: ``bad-environment`` (LISTEN_FDS is not a count), ``not-a-socket``, ``not-tcp``,
    ``not-listening``, ``unconfigured-address`` (a socket where the configuration does not listen)
    and ``missing-address`` (the configuration listens where no socket was passed).
    """

    kind: str
    fd: Optional[int]
    sentence: str
    remedy: str

    def __str__(self) -> str:
        return f"{self.sentence}; {self.remedy}"


class ActivationError(Exception):
    """The passed sockets cannot be served; `problem` says why and what to do."""

    def __init__(self, problem: ActivationProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def inherited_listeners(environ: Optional[MutableMapping[str, str]] = None, pid: Optional[int] = None,
                        first_fd: int = FIRST_FD) -> List[socket.socket]:
    """The TCP listening sockets systemd passed to this process, in descriptor order; [] if none.

    Sockets announced for another process (LISTEN_PID is not `pid`, as when a child inherited the
    environment) are not ours. The LISTEN_* variables are removed from `environ` (default
    os.environ) in every case, so no process the agent starts takes the sockets for its own.
    Raises ActivationError when a descriptor announced to us is not a TCP listening socket.
    `first_fd` is systemd's first descriptor (3); tests give their own.
    """
    env = os.environ if environ is None else environ
    announced_pid, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ENVIRONMENT:
        env.pop(name, None)
    if announced_pid is None or count_text is None:
        return []
    if announced_pid.strip() != str(os.getpid() if pid is None else pid):
        return []
    if not count_text.strip().isdigit():
        raise ActivationError(ActivationProblem(
            "bad-environment", None, f"LISTEN_FDS={count_text!r} is not a number of sockets",
            "start the agent from systemd (its socket unit) or without LISTEN_PID and LISTEN_FDS"))
    sockets: List[socket.socket] = []
    try:
        for fd in range(first_fd, first_fd + int(count_text)):
            sockets.append(_tcp_listener(fd))
    except ActivationError:
        for sock in sockets:
            sock.detach()  # the descriptors stay systemd's business; a failed start closes none
        raise
    return sockets


def _tcp_listener(fd: int) -> socket.socket:
    """Descriptor `fd` as a socket object, once it is known to be a listening TCP socket."""
    remedy = f"{SOCKET_UNIT} must pass TCP listening sockets only (ListenStream=ADDRESS:PORT lines)"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(ActivationProblem(
            "not-a-socket", fd, f"descriptor {fd} passed by systemd is not a socket "
                                f"({(exc.strerror or str(exc)).lower()})", remedy)) from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            raise ActivationError(ActivationProblem(
                "not-tcp", fd, f"descriptor {fd} passed by systemd is not a TCP socket", remedy))
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(ActivationProblem(
                "not-listening", fd, f"descriptor {fd} passed by systemd is not listening", remedy))
    except BaseException:
        sock.detach()
        raise
    sock.set_inheritable(False)
    return sock


def _address_text(host: str, port: int) -> str:
    where = "*" if not host else host
    return f"[{where}]:{port}" if ":" in where else f"{where}:{port}"


def _is_every_address(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _same_address(one: str, other: str) -> bool:
    return ipaddress.ip_address(one) == ipaddress.ip_address(other)


def endpoint_problem(sockets: Sequence[socket.socket], configured: Sequence[Endpoint]) -> Optional[ActivationProblem]:
    """None if the passed `sockets` listen exactly where `configured` says; else the first difference.

    A configured "" (every address) on a port is served by wildcard sockets on that port (one
    dual-stack [::] socket, as systemd makes for ``ListenStream=PORT``, or 0.0.0.0 and [::]). A
    configured address is served only by a socket bound to that very address: a wildcard socket
    would also answer on addresses the admin kept the agent off.
    """
    bound: List[Endpoint] = []
    for sock in sockets:
        name = sock.getsockname()
        bound.append((str(name[0]).split("%")[0], int(name[1])))

    def serves(endpoint: Endpoint, wanted: Endpoint) -> bool:
        (host, port), (want_host, want_port) = endpoint, wanted
        if port != want_port:
            return False
        return _is_every_address(host) if want_host == "" else _same_address(host, want_host)

    configured_text = ", ".join(_address_text(h, p) for h, p in configured)
    remedy = (f"make {SOCKET_UNIT} listen where the configuration says (systemctl edit {SOCKET_UNIT}: "
              f"ListenStream= lines for {configured_text}) or change listen and port in the configuration")
    for sock, endpoint in zip(sockets, bound):
        if not any(serves(endpoint, wanted) for wanted in configured):
            return ActivationProblem(
                "unconfigured-address", sock.fileno(),
                f"systemd passed a socket on {_address_text(*endpoint)}, where the agent is not configured "
                f"to listen (it listens on {configured_text})", remedy)
    for wanted in configured:
        if not any(serves(endpoint, wanted) for endpoint in bound):
            return ActivationProblem(
                "missing-address", None,
                f"the agent is configured to listen on {_address_text(*wanted)}, but systemd passed no "
                f"socket there (it passed {', '.join(_address_text(*e) for e in bound)})", remedy)
    return None
