"""The command line: keys add|list|remove, status, check (poll and serve: tests/integration)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from click.testing import CliRunner

from mitigator_agent import cli
from mitigator_agent.clock import kernel_clock_state
from mitigator_agent.hostkey import fingerprint_line, load_or_create_host_key
from mitigator_agent.snapshot import encode
from test_answers import SNAP
from test_clock import FakeNtpServer

ED1 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator1")
ED2 = asyncssh.generate_private_key("ssh-ed25519", comment="mitigator2")
RSA = asyncssh.generate_private_key("ssh-rsa", key_size=1024, comment="old")


def public(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def invoke(*args: str, input: str = None):
    return CliRunner().invoke(cli.main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    (tmp_path / "snapshot").write_bytes(encode(SNAP))
    return tmp_path


# --- keys -------------------------------------------------------------------

def test_keys_add_list_remove(files):
    keys = str(files / "keys")
    added = invoke("keys", "add", "--keys", keys, *public(ED1).split())  # unquoted words work
    assert added.exit_code == 0
    assert added.stdout == f"added: line 1 {ED1.get_fingerprint('sha256')} mitigator1\n"
    assert invoke("keys", "add", "--keys", keys, public(ED1)).stdout.startswith("already present: line 1 ")
    from_stdin = invoke("keys", "add", "--keys", keys, "-", input=f'from="192.0.2.1" {public(ED2)}\n\n')
    assert from_stdin.exit_code == 0 and from_stdin.stdout.startswith("added: line 2 ")

    listed = invoke("keys", "list", "--keys", keys)
    assert listed.exit_code == 0
    assert listed.stdout == (f"1: {ED1.get_fingerprint('sha256')} mitigator1\n"
                             f'2: {ED2.get_fingerprint("sha256")} mitigator2 [from="192.0.2.1"]\n')

    removed = invoke("keys", "remove", "--keys", keys, ED1.get_fingerprint("sha256"))
    assert removed.exit_code == 0 and removed.stdout.startswith("removed: line 1 ")
    assert invoke("keys", "list", "--keys", keys).stdout.startswith("1: " + ED2.get_fingerprint("sha256"))


def test_keys_add_refuses_non_ed25519(files):
    result = invoke("keys", "add", "--keys", str(files / "keys"), public(RSA))
    assert result.exit_code == 1
    assert result.stderr.startswith("refused: key type ssh-rsa refused: only ssh-ed25519 keys are admitted")
    assert not (files / "keys").exists()


def test_keys_remove_unknown_fails(files):
    (files / "keys").write_text(public(ED1) + "\n")
    result = invoke("keys", "remove", "--keys", str(files / "keys"), "nobody")
    assert result.exit_code == 1 and "matches 'nobody'" in result.stderr


def test_keys_list_shows_warnings_and_unsafe_modes(files):
    keys = files / "keys"
    keys.write_text(f"{public(RSA)}\n{public(ED1)}\n")
    keys.chmod(0o666)
    result = invoke("keys", "list", "--keys", str(keys))
    assert result.stdout == f"2: {ED1.get_fingerprint('sha256')} mitigator1\n"
    assert f"warning: {keys}:1: key type ssh-rsa refused" in result.stderr
    assert "warning: the agent admits nobody: keys file" in result.stderr
    add = invoke("keys", "add", "--keys", str(keys), public(ED2))
    assert add.exit_code == 0 and "warning: the agent would admit nobody" in add.stderr


# --- status -------------------------------------------------------------------

def clock_line() -> str:
    state = kernel_clock_state()
    word = "synchronised" if state.synchronized else "NOT synchronised"
    return f"clock: {word} (adjtimex state {state.state}, maxerror {state.maxerror_us // 1000} ms)\n"


def test_status_everything_present(files):
    host_key, _ = load_or_create_host_key(str(files / "host.ed25519"))
    (files / "keys").write_text(public(ED1) + "\n")
    result = invoke("status", "--keys", str(files / "keys"), "--host-key", str(files / "host.ed25519"),
                    "--device", str(files / "snapshot"))
    assert result.exit_code == 0
    assert result.stdout == (
        f"host key: {fingerprint_line(host_key)} ({files / 'host.ed25519'})\n"
        f"module: loaded, ABI 2, HZ 250, isn_algorithm seq_and_ts_off, cookie_clock wall, set_generation 3,"
        f" tcp_syncookies 2 ({files / 'snapshot'})\n"
        f"keys: 1 admitted ({files / 'keys'})\n"
        + clock_line()
    )


def test_status_nothing_there_yet(files):
    result = invoke("status", "--keys", str(files / "keys"), "--host-key", str(files / "host.ed25519"),
                    "--device", str(files / "absent"))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        f"host key: {files / 'host.ed25519'} missing (serve creates it)",
        f"module: not loaded (no {files / 'absent'})",
        f"keys: none admitted: keys file {files / 'keys'} does not exist",
    ]
    assert not (files / "host.ed25519").exists()  # status never creates the host key


# --- check --------------------------------------------------------------------

@pytest.fixture
def ssh_banner_port() -> Iterator[int]:
    """A listener that greets like an SSH server."""
    server = socket.create_server(("127.0.0.1", 0))

    def greet() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"SSH-2.0-mitigator_agent\r\n")

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    thread.join()
    server.close()


@pytest.fixture
def ntp_server() -> Iterator[FakeNtpServer]:
    server = FakeNtpServer(skew=0.0)
    yield server
    server.close()


def test_check_all_items(files, ntp_server, ssh_banner_port):
    result = invoke("check", "--device", str(files / "snapshot"), "--port", str(ssh_banner_port),
                    "--ntp-server", ntp_server.address)
    lines = result.stdout.splitlines()
    assert lines[0] == (f"ok   module loaded ({files / 'snapshot'}, ABI 2, HZ 250,"
                        " isn_algorithm seq_and_ts_off, cookie_clock wall, set_generation 3, tcp_syncookies 2)")
    assert lines[1] == "ok   device readable by the current user"
    assert lines[2] == "ok   tcp_syncookies = 2 (is 2)"
    synced = kernel_clock_state().synchronized
    assert lines[3].startswith("ok   kernel clock synchronised" if synced else
                               "FAIL kernel clock synchronised: no (adjtimex state")
    assert lines[4].startswith("ok   NTP offset ") and lines[4].endswith(f"against {ntp_server.address} (limit 100 ms)")
    assert lines[5] == f"ok   agent listening on 127.0.0.1:{ssh_banner_port}"
    assert result.exit_code == (0 if synced else 1)


def test_check_reports_one_reason_per_failure(files, monkeypatch):
    syncookies = files / "tcp_syncookies"
    syncookies.write_text("1\n")
    monkeypatch.setattr(cli, "SYNCOOKIES_PROC", str(syncookies))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        silent_ntp = f"127.0.0.1:{udp.getsockname()[1]}"
        closed_port = tcp.getsockname()[1]
        result = invoke("check", "--device", str(files / "absent"), "--port", str(closed_port),
                        "--ntp-server", silent_ntp, "--timeout", "0.2")
    assert result.exit_code == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failures[0] == f"FAIL module loaded: tcpsecrets module not loaded (no {files / 'absent'})"
    assert failures[1] == "FAIL tcp_syncookies = 2 (is 1)"
    assert any(line.startswith(f"FAIL NTP offset: no server answered ({silent_ntp}: ") for line in failures)
    assert failures[-1].startswith(f"FAIL agent listening: nothing listening on 127.0.0.1:{closed_port}")


def test_check_bad_snapshot_and_syncookies_from_it(files, ntp_server, ssh_banner_port):
    (files / "snapshot").write_bytes(encode(dataclasses.replace(SNAP, tcp_syncookies=1)))
    result = invoke("check", "--device", str(files / "snapshot"), "--port", str(ssh_banner_port),
                    "--ntp-server", ntp_server.address)
    assert "FAIL tcp_syncookies = 2 (is 1)" in result.stdout.splitlines()
    assert result.exit_code == 1
    (files / "snapshot").write_bytes(bytes(256))
    result = invoke("check", "--device", str(files / "snapshot"), "--port", "1",
                    "--ntp-server", ntp_server.address)
    assert f"FAIL device readable: {files / 'snapshot'}: bad snapshot magic" in result.stdout


def test_check_device_readable_by_the_agent_user(files, ntp_server, ssh_banner_port):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    if nobody.pw_uid == os.geteuid():
        pytest.skip("running as nobody")
    device = files / "snapshot"
    device.chmod(0o600)
    result = invoke("check", "--device", str(device), "--user", "nobody", "--port", str(ssh_banner_port),
                    "--ntp-server", ntp_server.address)
    if os.geteuid() == 0:  # tried for real, as nobody
        assert f"FAIL device readable by nobody: {device}: Permission denied (tried as nobody)" in result.stdout
    else:
        assert f"FAIL device readable by nobody: {device} (mode 0600, group " in result.stdout
    assert result.exit_code == 1


def test_check_reads_the_device_as_the_agent_user(request, ntp_server, ssh_banner_port):
    if os.geteuid() != 0:
        pytest.skip("trying a read as another user needs root")
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is not traversable by others
    shared.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(shared))
    device = shared / "snapshot"
    device.write_bytes(SNAP.to_bytes())
    device.chmod(0o640)
    os.chown(device, 0, nobody.pw_gid)  # group-readable, and nobody's primary group is that group
    args = ("check", "--device", str(device), "--user", "nobody", "--port", str(ssh_banner_port),
            "--ntp-server", ntp_server.address)
    assert "ok   device readable by nobody" in invoke(*args).stdout
    os.chown(device, 0, 0)
    assert f"FAIL device readable by nobody: {device}: Permission denied (tried as nobody)" in invoke(*args).stdout
