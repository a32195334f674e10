"""The SSH client libraries a MITIGATOR build can use, each driven for real: `get`, then an anycast `set`.

MITIGATOR's SSH client is not ours to choose.  Besides OpenSSH, Dropbear, PuTTY and paramiko
(test_interop.py, test_paramiko.py), these complete a `get` and a `set` against the running agent,
with the host key pinned as MITIGATOR pins it:

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
from typing import Callable, Dict, Tuple

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


@pytest.fixture
def anycast_agent(start_agent: Callable[..., AgentProcess], client_key: ClientKey, workdir: Path) -> AgentProcess:
    return start_agent(client_key.public_line + "\n", "--anycast-instance", "mitigator1",
                       "--state-dir", str(workdir / "state"))


@pytest.fixture(params=["go-x-crypto", "libssh", "libssh2"])
def client(request: pytest.FixtureRequest) -> Callable[[AgentProcess, ClientKey, str], Outcome]:
    if request.param == "go-x-crypto":
        return go_run(request.getfixturevalue("go_poll"))
    return {"libssh": libssh_run, "libssh2": libssh2_run}[request.param]


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
