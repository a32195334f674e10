"""The SSH clients a MITIGATOR build can use, each driven for real: `get`, then an anycast `set`.

MITIGATOR's SSH client is not ours to choose.  Each of these completes a `get` and a `set` against
the running agent, with the host key pinned as MITIGATOR pins it (more about each of the first
four in test_interop.py and test_paramiko.py):

- OpenSSH's ssh, Dropbear's dbclient (Debian 12: 2022.83), PuTTY's plink (0.78), paramiko;
- Go's golang.org/x/crypto/ssh: Debian 12's golang-go (1.19) and golang-golang-x-crypto-dev
  (0.4.0), clients/go_poll.go built offline here, from Debian's sources only;
- libssh, through PyPI's ssh-python (its own libssh);
- libssh2, through PyPI's ssh2-python (its own libssh2 1.11: Debian 12's libssh2 1.10 has none of
  the AEAD ciphers and encrypt-then-MAC MACs the agent offers, so it cannot connect at all).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import asyncssh
import paramiko
import pytest
from ssh import options as libssh_options
from ssh.key import import_privkey_file
from ssh.session import Session as LibsshSession
from ssh2.session import Session as Libssh2Session

from conftest import SSH_USER, WAIT_SECONDS, AgentProcess, ClientKey
from mitigator_agent import __version__
from mitigator_agent.answers import HostFacts, get_text
from mitigator_agent.clock import kernel_clock_synced
from mitigator_agent.snapshot import decode_set
from test_anycast_set import random_values, set_command

Outcome = Tuple[int, bytes, bytes]  # exit status, stdout, stderr
GO = shutil.which("go")
GO_SOURCE = Path(__file__).with_name("clients") / "go_poll.go"
GO_PATH = Path("/usr/share/gocode")  # Debian's golang-*-dev packages put their sources here


@pytest.fixture(scope="module")
def go_poll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go_poll.go built with Debian's Go and x/crypto, offline (no module download)."""
    if GO is None or not (GO_PATH / "src" / "golang.org" / "x" / "crypto" / "ssh").is_dir():
        pytest.fail("Go or x/crypto missing: apt-get install golang-go golang-golang-x-crypto-dev"
                    " (tests/provision-host.sh installs them)")
    out = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GO_PATH), "GOCACHE": str(out / "cache"),
           "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0"}
    result = subprocess.run([GO, "build", "-o", str(out / "go_poll"), GO_SOURCE.name], cwd=GO_SOURCE.parent,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out / "go_poll"


def go_run(go_poll: Path) -> Callable[[AgentProcess, ClientKey, str], Outcome]:
    def run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
        result = subprocess.run([str(go_poll), "127.0.0.1", str(agent.port("127.0.0.1")), str(key.path),
                                 str(agent.host_key_path) + ".pub", command], capture_output=True, timeout=WAIT_SECONDS)
        return result.returncode, result.stdout, result.stderr
    return run


def pinned_host_key(agent: AgentProcess) -> bytes:
    """The agent's host key as the SSH wire blob (what a pinning client compares)."""
    return base64.b64decode((Path(str(agent.host_key_path) + ".pub")).read_text().split()[1])


def drain(read: Callable[[], Tuple[int, bytes]]) -> bytes:
    """Everything a binding's blocking ``read() -> (size, data)`` gives until it reports the end."""
    data = b""
    while True:
        size, chunk = read()
        if size <= 0:
            return data
        data += chunk


def libssh2_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    with socket.create_connection(("127.0.0.1", agent.port("127.0.0.1")), timeout=WAIT_SECONDS) as sock:
        session = Libssh2Session()
        session.set_timeout(WAIT_SECONDS * 1000)
        session.handshake(sock)
        blob, _ = session.hostkey()
        assert bytes(blob) == pinned_host_key(agent), "host key differs from the pinned one"
        session.userauth_publickey_fromfile(SSH_USER, str(key.path))
        channel = session.open_session()
        channel.execute(command)
        out, err = drain(channel.read), drain(channel.read_stderr)
        channel.wait_eof()
        channel.close()
        channel.wait_closed()
        status = channel.get_exit_status()
        session.disconnect()
        return status, out, err


def libssh_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    session = LibsshSession()
    session.options_set(libssh_options.HOST, "127.0.0.1")
    session.options_set_port(agent.port("127.0.0.1"))
    session.options_set(libssh_options.USER, SSH_USER)
    session.options_set(libssh_options.TIMEOUT, str(WAIT_SECONDS))
    session.connect()
    try:
        assert session.get_server_publickey().export_pubkey_base64() == \
            Path(str(agent.host_key_path) + ".pub").read_text().split()[1].encode(), "host key differs"
        session.userauth_publickey(import_privkey_file(str(key.path)))
        channel = session.channel_new()
        channel.open_session()
        channel.request_exec(command)
        out, err = drain(channel.read), drain(lambda: channel.read(is_stderr=True))
        channel.send_eof()
        status = channel.get_exit_status()
        channel.close()
        return status, out, err
    finally:
        session.disconnect()


def openssh_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    result = agent.ssh(key, command)
    return result.returncode, result.stdout, result.stderr


def _batch(argv: List[str], home: Path) -> Outcome:
    """A client in batch mode, HOME of its own, no terminal (a question fails at once), never left behind."""
    home.mkdir(exist_ok=True)
    with subprocess.Popen(argv, env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as client:
        try:
            out, err = client.communicate(timeout=WAIT_SECONDS)
        finally:
            if client.returncode is None:
                client.kill()
                client.communicate()
    return client.returncode, out, err


def dropbear_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    home = agent.workdir / "dropbear-home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    algorithm, data = Path(str(agent.host_key_path) + ".pub").read_text().split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"127.0.0.1 {algorithm} {data}\n")  # dbclient pins by host name
    identity = key.path.with_suffix(".dropbear")
    if not identity.exists():
        subprocess.run([shutil.which("dropbearconvert") or "dropbearconvert", "openssh", "dropbear", str(key.path),
                        str(identity)], check=True, capture_output=True, timeout=WAIT_SECONDS)
    return _batch([shutil.which("dbclient") or "dbclient", "-p", str(agent.port("127.0.0.1")), "-i", str(identity),
                   f"{SSH_USER}@127.0.0.1", command], home)


def plink_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    ppk = key.path.with_suffix(".ppk")
    if not ppk.exists():
        subprocess.run([shutil.which("puttygen") or "puttygen", str(key.path), "-O", "private", "-o", str(ppk)],
                       check=True, capture_output=True, timeout=WAIT_SECONDS)
    pin = asyncssh.read_public_key(str(agent.host_key_path) + ".pub").get_fingerprint("sha256")
    return _batch([shutil.which("plink") or "plink", "-ssh", "-batch", "-noagent", "-P", str(agent.port("127.0.0.1")),
                   "-l", SSH_USER, "-i", str(ppk), "-hostkey", pin, "127.0.0.1", command], agent.workdir / "plink-home")


def paramiko_run(agent: AgentProcess, key: ClientKey, command: str) -> Outcome:
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{agent.port('127.0.0.1')}", "ssh-ed25519",
                               paramiko.Ed25519Key.from_private_key_file(str(agent.host_key_path)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect("127.0.0.1", port=agent.port("127.0.0.1"), username=SSH_USER, key_filename=str(key.path),
                       allow_agent=False, look_for_keys=False, timeout=WAIT_SECONDS, auth_timeout=WAIT_SECONDS,
                       banner_timeout=WAIT_SECONDS)
        _, stdout, stderr = client.exec_command(command, timeout=WAIT_SECONDS)
        out, err = stdout.read(), stderr.read()
        return stdout.channel.recv_exit_status(), out, err
    finally:
        client.close()


@pytest.fixture
def anycast_agent(start_agent: Callable[..., AgentProcess], client_key: ClientKey, workdir: Path) -> AgentProcess:
    return start_agent(client_key.public_line + "\n", "--anycast-instance", "mitigator1",
                       "--state-dir", str(workdir / "state"))


DRIVERS: Dict[str, Callable[[AgentProcess, ClientKey, str], Outcome]] = {
    "openssh": openssh_run, "dropbear": dropbear_run, "putty-plink": plink_run, "paramiko": paramiko_run,
    "libssh": libssh_run, "libssh2": libssh2_run}


@pytest.fixture(params=[*DRIVERS, "go-x-crypto"])
def client(request: pytest.FixtureRequest) -> Callable[[AgentProcess, ClientKey, str], Outcome]:
    if request.param == "go-x-crypto":
        return go_run(request.getfixturevalue("go_poll"))
    return DRIVERS[request.param]


def test_get_and_set(client, anycast_agent: AgentProcess, client_key: ClientKey, snapshot) -> None:
    facts = HostFacts(os.uname().sysname, os.uname().release, __version__, kernel_clock_synced())
    assert client(anycast_agent, client_key, "get") == (0, get_text(snapshot, facts).encode(), b"")
    values = random_values()
    assert client(anycast_agent, client_key, set_command(values)) == (0, b"ok\n", b"")
    assert decode_set(anycast_agent.device_path.read_bytes()[:120]) == values
    refused: Dict[str, Outcome] = {"unknown": client(anycast_agent, client_key, "nonsense")}
    assert refused["unknown"][0] == 1 and refused["unknown"][2].startswith(b"unknown command")
    anycast_agent.wait_for(r"poll .*instance=mitigator1 .*command=get status=0 ")
    anycast_agent.wait_for(r'poll .*instance=mitigator1 .*command="set\.\.\..* status=0 ')
