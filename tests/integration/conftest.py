"""Fixtures that run the real agent (console script) and real SSH clients.

Every agent runs as ``mitigator-agent serve --port 0`` on 127.0.0.1 and ::1
in a temporary directory, with a keys file, a host key it creates itself and
a snapshot file made with snapshot.encode().  Tests synchronise on the
agent's log lines (``wait_for``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import asyncssh
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from safe_tmp import isolate_from_the_machine, safe_tmp_path  # noqa: E402  (shared with tests/unit)

isolate_from_the_machine()  # never the machine's /opt/mitigator_agent/agent.toml

import mitigator_agent
from mitigator_agent.cookies import wall_ts_shift_ms
from mitigator_agent.snapshot import (
    ABI_VERSION,
    CLOCK_WALL,
    F_ALG_SEQ_AND_TS_OFF,
    F_COOKIE_ACCEPT,
    F_NET_SECRET,
    F_SENDSYN_DROP,
    F_SET_ALLOWED,
    F_SYNCOOKIE,
    F_SYNCOOKIE6,
    F_TS_OFFSET_HOOK,
    F_TS_SECRET,
    F_WALL_CLOCK,
    STRUCT_SIZE,
    Snapshot,
    encode,
)

AGENT = str(Path(sys.executable).with_name("mitigator-agent"))
# The agent runs as a subprocess: make it import the very package these
# tests import (a checkout next to the venv's editable install, say), not
# whatever the console script's environment would find first.
_PACKAGE_ROOT = str(Path(mitigator_agent.__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_PACKAGE_ROOT] + [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry])
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_USER = "mitigator_agent"
WAIT_SECONDS = 30  # upper bound on any wait; a healthy run never gets near it
LISTEN_RE = re.compile(r"listening on (?:\[([^\]]+)\]|([^:\s]+)):(\d+)(?: \(from systemd\))?$")
LOOPBACK_VIA = {"127.0.0.1": "0.0.0.0", "::1": "::"}  # reached through a wildcard listener


def run_agent(*args: str, stdin: Optional[str] = None, bound: float = WAIT_SECONDS) -> subprocess.CompletedProcess:
    """``mitigator-agent ARGS`` as an admin runs it; its exit status and text output."""
    return subprocess.run([AGENT, *args], input=stdin, capture_output=True, text=True, timeout=bound)


def keys_cmd(*args: str, stdin: str = "", bound: float = WAIT_SECONDS) -> subprocess.CompletedProcess:
    """``mitigator-agent keys ARGS`` with ``stdin`` (empty unless given)."""
    return run_agent("keys", *args, stdin=stdin, bound=bound)


def make_snapshot() -> Snapshot:
    """The module's default on a 6.1.192+ kernel (wall clock, TS hook), random secrets.

    Random secrets make the log greps mean something.  set_generation 0:
    no anycast set applied since the module was loaded.
    """
    realtime_ns, tcp_clock_ms = 1_763_894_400_123_456_789, 0x1_2345_6789
    return Snapshot(
        abi_version=ABI_VERSION,
        size=STRUCT_SIZE,
        flags=(F_SYNCOOKIE | F_SYNCOOKIE6 | F_NET_SECRET | F_TS_SECRET | F_ALG_SEQ_AND_TS_OFF | F_COOKIE_ACCEPT
               | F_WALL_CLOCK | F_TS_OFFSET_HOOK | F_SENDSYN_DROP | F_SET_ALLOWED),
        hz=250,
        realtime_ns=realtime_ns,
        tcp_clock_ms=tcp_clock_ms,
        jiffies64=(1 << 32) - 300 * 250 + 250 * 3600,
        syncookie_secret=os.urandom(32),
        syncookie6_secret=os.urandom(32),
        net_secret=os.urandom(16),
        ts_secret=os.urandom(16),
        tcp_syncookies=2,
        tcp_timestamps=1,
        tcp_sack=1,
        tcp_window_scaling=1,
        tcp_ecn=2,
        cookie_clock=CLOCK_WALL,
        ts_shift_ms=wall_ts_shift_ms(realtime_ns // 10**6 - 1000, tcp_clock_ms - 1000),
    )


@dataclass
class ClientKey:
    """A client key pair on disk, as an SSH client uses it."""

    path: Path
    key: asyncssh.SSHKey

    @property
    def public_line(self) -> str:
        return self.key.export_public_key("openssh").decode().strip()

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint("sha256")


def make_client_key(directory: Path, name: str, algorithm: str = "ssh-ed25519") -> ClientKey:
    options = {"key_size": 2048} if algorithm == "ssh-rsa" else {}
    key = asyncssh.generate_private_key(algorithm, comment=name, **options)
    path = directory / f"{name}.key"
    key.write_private_key(str(path))
    path.chmod(0o600)  # OpenSSH refuses group/other-readable identities
    return ClientKey(path, key)


class AgentProcess:
    """A running ``mitigator-agent serve`` and its collected log lines."""

    def __init__(self, workdir: Path, extra_args: Sequence[str],
                 listen: Sequence[str] = ("127.0.0.1", "::1"), command_prefix: Sequence[str] = (),
                 pass_fds: Sequence[int] = ()) -> None:
        self.workdir = workdir
        self.keys_path = workdir / "keys"
        self.host_key_path = workdir / "host.ed25519"
        self.device_path = workdir / "snapshot"
        self.runtime_dir = workdir / "run"
        # The machine's own config is never read; the state (known sources, anycast) stays in workdir.
        self.config_path = workdir / "isolated.toml"
        if not self.config_path.exists():
            self.config_path.write_text(f'state-dir = "{workdir / "state"}"\n')
            self.config_path.chmod(0o644)
        self.lines: List[str] = []
        self._changed = threading.Condition()
        listen_args = [arg for address in listen for arg in ("--listen", address)]
        args = [*command_prefix, AGENT, "serve", "--config", str(self.config_path), "--port", "0", *listen_args,
                "--keys", str(self.keys_path), "--host-key", str(self.host_key_path),
                "--device", str(self.device_path), "--runtime-dir", str(self.runtime_dir), *extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace", cwd=workdir, pass_fds=pass_fds)
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        try:
            self._await_listening(workdir, listen)
        except BaseException:
            self.stop()  # a failed start must not leave the agent running
            raise

    def _await_listening(self, workdir: Path, listen: Sequence[str]) -> None:
        """Wait for each address's ``listening on`` line; write a known_hosts pinning the created host key."""
        self.ports = {(match.group(1) or match.group(2)): int(match.group(3))
                      for match in self.wait_for_all(LISTEN_RE, len(listen) or 2)}
        self.known_hosts = workdir / "known_hosts"
        key_type, key_data = (workdir / "host.ed25519.pub").read_text().split()[:2]
        # Renamed into place: a client of an earlier agent in this workdir may be reading it.
        staged = workdir / "known_hosts.new"
        staged.write_text("".join(  # each loopback this agent serves (one, with --listen ADDR)
            f"[{host}]:{self.port(host)} {key_type} {key_data}\n" for host in LOOPBACK_VIA
            if host in self.ports or LOOPBACK_VIA[host] in self.ports))
        staged.rename(self.known_hosts)

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def mark(self) -> int:
        """Index of the next log line: wait_for(..., start=mark) sees only newer events."""
        with self._changed:
            return len(self.lines)

    def wait_for_all(self, pattern: Union[str, "re.Pattern[str]"], count: int,
                     start: int = 0) -> List["re.Match[str]"]:
        """Block until ``count`` log lines from index ``start`` match; return the matches."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        matches: List["re.Match[str]"] = []
        index = start
        # One deadline for the whole wait: an agent that keeps logging
        # other lines (under a flood, say) must not keep it waiting forever.
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while True:
                while index < len(self.lines) and len(matches) < count:
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        matches.append(match)
                if len(matches) == count:
                    return matches
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"agent exited ({self.process.returncode}) before"
                                         f" {regex.pattern!r}:\n{self.log_unlocked()}")
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no log line matched {regex.pattern!r}:\n{self.log_unlocked()}")

    def wait_for(self, pattern: Union[str, "re.Pattern[str]"], start: int = 0) -> "re.Match[str]":
        """Block until a log line from index ``start`` matches; return the match."""
        return self.wait_for_all(pattern, 1, start)[0]

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def count(self, pattern: str, start: int = 0) -> int:
        with self._changed:
            return sum(1 for line in self.lines[start:] if re.search(pattern, line))

    @property
    def log(self) -> str:
        with self._changed:
            return self.log_unlocked()

    def port(self, host: str) -> int:
        """The port serving ``host`` (127.0.0.1 or ::1), directly or via a wildcard address."""
        return self.ports.get(host) or self.ports[LOOPBACK_VIA[host]]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(WAIT_SECONDS)

    def ssh_command(self, key: ClientKey, host: str = "127.0.0.1",
                    options: Sequence[str] = (), program: str = SSH) -> List[str]:
        """Argument list for the real OpenSSH client against this agent (no command)."""
        port_flag = "-P" if program.endswith(("sftp", "scp")) else "-p"
        return [
            program, "-F", "/dev/null", port_flag, str(self.port(host)), "-i", str(key.path),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ConnectTimeout=20", *options,
        ]

    def ssh(self, key: ClientKey, *command: Union[str, bytes], host: str = "127.0.0.1",
            options: Sequence[str] = (), stdin: Optional[bytes] = b"") -> subprocess.CompletedProcess:
        """Run the OpenSSH client; stdout/stderr as bytes."""
        args: List[Union[str, bytes]] = [*self.ssh_command(key, host, options), f"{SSH_USER}@{host}", *command]
        return subprocess.run(args, input=stdin, capture_output=True, timeout=WAIT_SECONDS)

    def asyncssh_run(self, key: Optional[ClientKey], command: Optional[str], host: str = "127.0.0.1",
                     **connect_options: object) -> asyncssh.SSHCompletedProcess:
        """Run one command with asyncssh as the client (pinned host key).

        ``key`` None: pass the keys (or none) as ``client_keys=``.
        """
        connect_options.setdefault("client_keys", [key.key] if key else [])

        async def run() -> asyncssh.SSHCompletedProcess:
            async with asyncssh.connect(
                host, self.port(host), username=SSH_USER,
                known_hosts=str(self.known_hosts), agent_path=None, config=None,
                **connect_options,
            ) as conn:
                return await conn.run(command)
        return asyncio.run(asyncio.wait_for(run(), WAIT_SECONDS))


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Overrides pytest's tmp_path: below ~/.cache, not /tmp (mode 1777 fails StrictModes)."""
    yield from safe_tmp_path(re.sub(r"[^\w-]", "_", request.node.name))


@pytest.fixture
def snapshot() -> Snapshot:
    return make_snapshot()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)  # strict modes: not writable by group/other
    return tmp_path


@pytest.fixture
def client_key(workdir: Path) -> ClientKey:
    return make_client_key(workdir, "mitigator1")


@pytest.fixture
def second_key(workdir: Path) -> ClientKey:
    return make_client_key(workdir, "mitigator2")


@pytest.fixture
def start_agent(workdir: Path, snapshot: Snapshot) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: start_agent(keys_text, *extra_serve_args, listen=..., command_prefix=..., pass_fds=...) -> AgentProcess.

    ``command_prefix`` runs the agent through another program (``setpriv ...``), which
    gets the descriptors ``pass_fds``.
    """
    agents: List[AgentProcess] = []

    def start(keys_text: Optional[str], *extra_args: str, listen: Sequence[str] = ("127.0.0.1", "::1"),
              command_prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> AgentProcess:
        if keys_text is not None:
            (workdir / "keys").write_text(keys_text)
            (workdir / "keys").chmod(0o644)
        (workdir / "snapshot").write_bytes(encode(snapshot))
        agent = AgentProcess(workdir, extra_args, listen, command_prefix, pass_fds)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess], client_key: ClientKey) -> AgentProcess:
    """An agent admitting client_key (instance mitigator1)."""
    return start_agent(client_key.public_line + "\n")
