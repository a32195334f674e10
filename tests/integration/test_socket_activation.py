"""Socket activation: the agent serves the socket systemd holds, and a restart loses no poll.

The test plays systemd's part: it owns a listening socket and starts each agent with it as
descriptor 3, LISTEN_FDS=1 and LISTEN_PID the agent's own pid, as systemd does for
mitigator-agent.socket. Polls are real OpenSSH `get`s.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest

import asyncssh

from conftest import AGENT, WAIT_SECONDS, AgentProcess, ClientKey
from mitigator_agent.server import AgentServer, ServerSettings
from tests.polling import PollingThrough

# What systemd does between fork and exec: the socket at descriptor 3 and the two variables,
# LISTEN_PID naming the process that runs the agent (exec keeps the pid).
AS_SYSTEMD = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
              "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
              "os.execv(sys.argv[2], sys.argv[2:])")


def as_systemd(held: socket.socket) -> List[str]:
    return [sys.executable, "-c", AS_SYSTEMD, str(held.fileno())]


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """The listening socket systemd would hold: 127.0.0.1, a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock


def get_command(agent: AgentProcess, key: ClientKey) -> List[str]:
    """One OpenSSH `get` against `agent` (every agent of a test serves the same port and host key)."""
    return [*agent.ssh_command(key), "mitigator_agent@127.0.0.1", "get"]


def test_the_agent_serves_the_socket_systemd_passed(start_agent: Callable[..., AgentProcess],
                                                    client_key: ClientKey, held: socket.socket) -> None:
    port = held.getsockname()[1]
    agent = start_agent(client_key.public_line + "\n", listen=(f"127.0.0.1:{port}",),
                        command_prefix=as_systemd(held), pass_fds=(held.fileno(),))
    assert agent.port("127.0.0.1") == port
    agent.wait_for(rf"listening on 127\.0\.0\.1:{port} \(from systemd\)$")
    done = agent.ssh(client_key, "get")
    assert done.returncode == 0 and b"net_secret: " in done.stdout, done.stderr


def test_a_restart_loses_no_poll(start_agent: Callable[..., AgentProcess], client_key: ClientKey,
                                 held: socket.socket) -> None:
    port = held.getsockname()[1]

    def start() -> AgentProcess:
        return start_agent(client_key.public_line + "\n", listen=(f"127.0.0.1:{port}",),
                           command_prefix=as_systemd(held), pass_fds=(held.fileno(),))

    first = start()
    poller = PollingThrough(get_command(first, client_key), timeout=WAIT_SECONDS)
    poller.start()
    try:
        poller.wait_answered(2, since=0.0, timeout=WAIT_SECONDS)
        first.process.terminate()
        assert first.process.wait(WAIT_SECONDS) == 0, first.log
        gone = time.monotonic()
        # Nobody accepts for a while, as when the next agent is slow to start: polls wait in the
        # socket's queue, and the port is never closed.
        time.sleep(2.0)
        restarting = time.monotonic()
        second = start()
        poller.wait_answered(3, since=time.monotonic(), timeout=WAIT_SECONDS)
    finally:
        poller.stop()
    failed = [p for p in poller.polls if not p.answered]
    assert failed == [], failed
    # A poll was waiting in the socket's queue when the next agent started (polls pause 0.5 s, the
    # gap lasts 2 s), and that agent answered it. (It may have started before `gone`, queued while
    # the first agent drained: polls run one after another.)
    assert any(p.started < restarting < p.started + p.seconds for p in poller.polls), (gone, poller.polls)
    assert "stopping" in first.log
    assert second.process.poll() is None


def test_polls_under_way_at_each_stop_are_answered(start_agent: Callable[..., AgentProcess],
                                                   client_key: ClientKey, held: socket.socket) -> None:
    """Four clients polling back to back through twenty restarts: every poll is answered.

    Each stop finds polls at every stage (queued, accepted a moment ago, authenticating,
    authenticated and about to open their session, running `get`): none may be cut.
    Four clients: no more than the per-source limit of unauthenticated connections (4).
    """
    port = held.getsockname()[1]

    def start() -> AgentProcess:
        return start_agent(client_key.public_line + "\n", listen=(f"127.0.0.1:{port}",),
                           command_prefix=as_systemd(held), pass_fds=(held.fileno(),))

    agent = start()
    pollers = [PollingThrough(get_command(agent, client_key), interval=0.0, timeout=WAIT_SECONDS)
               for _ in range(4)]
    for poller in pollers:
        poller.start()
    try:
        for _restart in range(20):
            poller_counts = [len(poller.polls) for poller in pollers]
            deadline = time.monotonic() + WAIT_SECONDS
            while any(len(p.polls) < n + 2 for p, n in zip(pollers, poller_counts)):
                assert time.monotonic() < deadline, [p.polls[-1:] for p in pollers]
                time.sleep(0.05)
            agent.process.terminate()
            assert agent.process.wait(WAIT_SECONDS) == 0, agent.log
            assert "still open after" not in agent.log, agent.log
            agent = start()
    finally:
        for poller in pollers:
            poller.stop()
    polls = [poll for poller in pollers for poll in poller.polls]
    assert [poll for poll in polls if not poll.answered] == []


async def banner_after_a_stop_in_the_accepts_turn(workdir: Path) -> bytes:
    """Connect, then stop the server in the loop turn that sets the accepted connection up; what it sends.

    asyncio accepts in one loop turn and sets the connection up in a task that runs in the next;
    a stop that closes the listener in between has the setup fail (the listener is gone), and the
    connection is dropped with the client's bytes unread: a reset, the client's
    "kex_exchange_identification: read: Connection reset by peer" once the process exits (here,
    where the loop goes on, no banner comes). A SIGTERM can land there.
    """
    (workdir / "keys").write_text("")
    (workdir / "keys").chmod(0o644)
    server = AgentServer(ServerSettings(port=0, listen=("127.0.0.1",), keys_path=str(workdir / "keys"),
                                        device=str(workdir / "snapshot")),
                         asyncssh.generate_private_key("ssh-ed25519"))
    (_, port), = await server.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as client:
        # Loopback completes the handshake at once: the connection waits in the accept queue.
        client.sendall(b"SSH-2.0-stopped-in-the-accept\r\n")
        # In the next turn this step, then the accept, run; each schedules its follow-up (the
        # stop's first step, the connection's setup) for the turn after, in that order.
        await asyncio.sleep(0)
        stopping = asyncio.get_running_loop().create_task(server.close(drain_seconds=1.0))
        banner = await asyncio.get_running_loop().run_in_executor(None, client.recv, 256)
        await stopping
    return banner


def test_a_connection_accepted_in_the_stops_loop_turn_gets_the_banner(workdir: Path) -> None:
    try:
        banner = asyncio.run(banner_after_a_stop_in_the_accepts_turn(workdir))
    except (ConnectionResetError, socket.timeout) as dropped:
        pytest.fail(f"the connection accepted as the stop came was dropped: {dropped!r}")
    assert banner.startswith(b"SSH-2.0-"), banner


def serve_and_fail(workdir: Path, held: socket.socket, listen: Sequence[str]) -> subprocess.CompletedProcess:
    """`serve` with the held socket passed and `listen` configured: expected to refuse; its output."""
    config = workdir / "isolated.toml"
    config.write_text(f'state-dir = "{workdir / "state"}"\n')
    args = [*as_systemd(held), AGENT, "serve", "--config", str(config), "--port", "0",
            *[arg for address in listen for arg in ("--listen", address)],
            "--keys", str(workdir / "keys"), "--host-key", str(workdir / "host.ed25519"),
            "--device", str(workdir / "snapshot"), "--runtime-dir", str(workdir / "run")]
    return subprocess.run(args, capture_output=True, text=True, timeout=WAIT_SECONDS,
                          pass_fds=(held.fileno(),), cwd=workdir)


def test_a_socket_where_the_configuration_does_not_listen_is_refused_and_kept(
        start_agent: Callable[..., AgentProcess], client_key: ClientKey, held: socket.socket,
        workdir: Path) -> None:
    port = held.getsockname()[1]
    (workdir / "keys").write_text(client_key.public_line + "\n")
    (workdir / "keys").chmod(0o644)
    (workdir / "snapshot").write_bytes(b"")
    other = port + 1 if port < 65535 else port - 1
    done = serve_and_fail(workdir, held, [f"127.0.0.1:{other}"])
    assert done.returncode == 1, done
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "cannot-start" in line]
    assert lines, done
    assert f"127.0.0.1:{port}" in lines[-1] and f"127.0.0.1:{other}" in lines[-1]
    assert "systemctl edit mitigator-agent.socket" in lines[-1]
    # The refusing agent closed nothing of systemd's: the socket still listens, and an agent
    # configured for it serves it.
    assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    agent = start_agent(None, listen=(f"127.0.0.1:{port}",), command_prefix=as_systemd(held),
                        pass_fds=(held.fileno(),))
    done_get = agent.ssh(client_key, "get")
    assert done_get.returncode == 0, done_get.stderr


def test_a_stop_closes_an_idle_connection_instead_of_waiting_the_drain_out(
        start_agent: Callable[..., AgentProcess], client_key: ClientKey) -> None:
    agent = start_agent(client_key.public_line + "\n", "--idle-timeout", "0")
    with subprocess.Popen([*agent.ssh_command(client_key), "-N", "mitigator_agent@127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as held:
        agent.wait_for(r"source-remembered src=127\.0\.0\.1 ")
        agent.process.terminate()
        assert agent.process.wait(WAIT_SECONDS) == 0
        # the agent hung up on it (not the other way round), and nothing was left for the drain
        assert held.wait(WAIT_SECONDS) == 255
    assert "still open after" not in agent.log
    assert "stopping" in agent.log
