"""Every refusal, shown with a real client, and the agent still serving afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from conftest import AGENT, SSH_USER, WAIT_SECONDS, make_client_key

READINESS_POLL_SECONDS = 0.05


def wait_for_path(path: Path, process: subprocess.Popen) -> None:
    """Readiness check for a socket another process creates."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(READINESS_POLL_SECONDS)


def assert_refused_login(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 255
    assert b"Permission denied (publickey)" in result.stderr


# --- forwarding, subsystems, PTY, env -------------------------------------

def test_local_port_forwarding_refused(agent, client_key, workdir):
    local_socket = workdir / "forward.sock"
    forward = subprocess.Popen(
        [*agent.ssh_command(client_key), "-N", "-L", f"{local_socket}:127.0.0.1:22",
         f"{SSH_USER}@127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_path(local_socket, forward)
        start = agent.mark()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(local_socket))
            assert client.recv(100) == b""  # the agent refused the direct-tcpip channel
        agent.wait_for(r'refused .*instance=mitigator1 .*request="port forwarding" to=127.0.0.1:22', start)
    finally:
        # SIGKILL, not SIGTERM: OpenSSH 9.2's client loop checks for a SIGTERM
        # and then enters poll() (not ppoll()), so one that lands in between
        # is only noticed at its next wakeup, up to 300 s later (seen here).
        forward.kill()
        forward.communicate(timeout=WAIT_SECONDS)
    assert agent.ssh(client_key, "get").returncode == 0


def test_remote_port_forwarding_refused(agent, client_key):
    result = agent.ssh(client_key, options=["-N", "-R", "0:127.0.0.1:9", "-o", "ExitOnForwardFailure=yes"])
    assert result.returncode == 255
    assert b"remote port forwarding failed" in result.stderr
    agent.wait_for(r'refused .*request="remote port forwarding"')


def test_sftp_refused(agent, client_key):
    sftp = subprocess.run([*agent.ssh_command(client_key, program="sftp"), "-b", "-", f"{SSH_USER}@127.0.0.1"],
                          input=b"ls\n", capture_output=True, timeout=WAIT_SECONDS)
    assert sftp.returncode != 0
    assert b"subsystem request failed" in sftp.stderr
    agent.wait_for(r"refused .*request=subsystem name=sftp")


def test_scp_refused_in_both_protocols(agent, client_key, workdir):
    for mode in (["-O"], []):  # legacy scp (an exec request), then scp over sftp
        scp = subprocess.run([*agent.ssh_command(client_key, program="scp"), *mode,
                              f"{SSH_USER}@127.0.0.1:/etc/hostname", str(workdir / "copy")],
                             capture_output=True, timeout=WAIT_SECONDS)
        assert scp.returncode != 0
    assert not (workdir / "copy").exists()
    # an unknown command is logged by its verb only (arguments may hold secrets)
    agent.wait_for(r'poll .*command="scp\.\.\.\(\+17 chars not logged\)" status=1 result="unknown command"')
    agent.wait_for(r"refused .*request=subsystem name=sftp")


def test_pty_refused(agent, client_key):
    result = agent.ssh(client_key, "get", options=["-tt"])
    assert b"PTY allocation request failed" in result.stderr
    agent.wait_for(r"refused .*instance=mitigator1 .*request=pty$")


def test_env_requests_are_ignored_and_logged_at_debug_only(start_agent, client_key):
    agent = start_agent(client_key.public_line + "\n", "--verbose")
    result = agent.ssh(client_key, "get", options=["-o", "SetEnv=MITIGATOR_TEST=1"])
    assert result.returncode == 0  # OpenSSH sends env without asking for a reply
    agent.wait_for(r"^DEBUG env-ignored src=127\.0\.0\.1:\d+ user=mitigator_agent instance=mitigator1 key=SHA256:\S+ name=MITIGATOR_TEST$")
    assert agent.asyncssh_run(client_key, "get", env={"LANG": "C"}).exit_status == 0
    agent.wait_for(r"^DEBUG env-ignored src=127\.0\.0\.1:\d+ user=mitigator_agent instance=mitigator1 key=SHA256:\S+ name=LANG$")
    assert agent.count(r"refused") == 0  # a stock client's LANG is not a refusal


def test_env_requests_leave_no_line_at_the_default_level(agent, client_key):
    start = agent.mark()
    assert agent.ssh(client_key, "get", options=["-o", "SetEnv=LANG=C"]).returncode == 0
    agent.wait_for(r"^INFO poll .*command=get status=0", start)
    assert agent.count(r"env", start) == 0


def test_agent_forwarding_refused(agent, client_key, workdir):
    agent_socket = workdir / "ssh-agent.sock"
    ssh_agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(agent_socket, ssh_agent)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_socket)}
        args = [*agent.ssh_command(client_key, options=["-A"]), f"{SSH_USER}@127.0.0.1", "get"]
        result = subprocess.run(args, env=env, capture_output=True, timeout=WAIT_SECONDS)
    finally:
        ssh_agent.terminate()
        ssh_agent.wait(WAIT_SECONDS)
    assert result.returncode == 0
    agent.wait_for(r'refused .*request="agent forwarding"$')


def test_x11_forwarding_refused(agent, client_key):
    env = {**os.environ, "DISPLAY": ":0"}
    args = [*agent.ssh_command(client_key, options=["-X"]), f"{SSH_USER}@127.0.0.1", "get"]
    result = subprocess.run(args, env=env, capture_output=True, timeout=WAIT_SECONDS)
    assert b"X11 forwarding request failed" in result.stderr
    agent.wait_for(r'refused .*request="X11 forwarding"$')


# --- authentication --------------------------------------------------------

def test_password_and_keyboard_interactive_refused(agent, client_key):
    result = agent.ssh(client_key, "get", options=[
        "-o", "PreferredAuthentications=password,keyboard-interactive",
        "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"])
    assert_refused_login(result)  # the agent only offers publickey
    agent.wait_for(r'refused src=127.0.0.1:\d+ user=mitigator_agent request=login reason="closed before')
    with pytest.raises(asyncssh.PermissionDenied):
        agent.asyncssh_run(None, "get", password="secret",
                           preferred_auth="password,keyboard-interactive")


def test_rsa_key_in_keys_file_refused_with_warning(start_agent, client_key, workdir):
    rsa = make_client_key(workdir, "rsa-instance", "ssh-rsa")
    agent = start_agent(f"{rsa.public_line}\n{client_key.public_line}\n")
    agent.wait_for(rf"keys-file-warning problem=\"{re.escape(str(agent.keys_path))}:1: key type ssh-rsa refused")
    # The agent's server-sig-algs names ssh-ed25519 only, so OpenSSH finds no
    # signature algorithm for an RSA key and never offers it.
    start = agent.mark()
    result = agent.ssh(rsa, "get", options=["-v"])
    assert_refused_login(result)
    assert b"server-sig-algs=<ssh-ed25519>" in result.stderr
    agent.wait_for(r'refused src=127.0.0.1:\d+ user=mitigator_agent request=login reason="closed before'
                   r' authenticating"', start)
    # A client that ignores server-sig-algs and offers it anyway (asyncssh
    # falls back to the key's own algorithm) is refused by the agent, with
    # the reason and without the line's instance name.
    start = agent.mark()
    with pytest.raises(asyncssh.PermissionDenied):
        agent.asyncssh_run(rsa, "get")
    line = agent.wait_for(rf'refused src=127.0.0.1:\d+ user=mitigator_agent request=publickey'
                          rf' offered={re.escape(rsa.fingerprint)} reason="key type ssh-rsa refused', start)
    assert "instance=" not in line.string
    assert agent.ssh(client_key, "get").returncode == 0


def test_a_listed_key_claimed_without_its_signature_is_refused_and_logged_without_instance(agent, client_key,
                                                                                          second_key, workdir):
    # OpenSSH offers the public half (claimed.pub: the listed key) first,
    # without a signature, and the agent says the key would do (PK_OK).  The
    # private key beside it is another one, so no valid signature follows.
    # The refusal must not name the instance the key belongs to, since
    # nothing was proven (issue 9: "a refused login carries no instance name").
    claimed = workdir / "claimed"
    claimed.write_bytes(second_key.path.read_bytes())
    claimed.chmod(0o600)
    (workdir / "claimed.pub").write_text(client_key.public_line + "\n")
    args = [*agent.ssh_command(client_key, options=["-v"]), f"{SSH_USER}@127.0.0.1", "get"]
    args[args.index(str(client_key.path))] = str(claimed)
    start = agent.mark()
    result = subprocess.run(args, capture_output=True, timeout=WAIT_SECONDS)
    assert_refused_login(result)
    assert b"Server accepts key: " + str(claimed).encode() in result.stderr  # the claim got PK_OK
    line = agent.wait_for(r'refused src=127.0.0.1:\d+ .*request=login reason="closed before authenticating"', start)
    assert "instance=" not in line.string and "key=" not in line.string
    assert not any("mitigator1" in logged for logged in agent.lines[start:])


def test_unknown_ed25519_key_refused(agent, second_key):
    assert_refused_login(agent.ssh(second_key, "get"))
    agent.wait_for(rf'refused .*request=publickey offered={re.escape(second_key.fingerprint)} reason="key not in keys file"')


def test_too_many_refused_keys_disconnects(agent, workdir):
    strangers = [make_client_key(workdir, f"stranger{n}").key for n in range(8)]
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError)):
        agent.asyncssh_run(None, "get", client_keys=strangers)
    agent.wait_for(r'refused .*request=login reason="6 keys refused, disconnecting"')


@pytest.mark.parametrize("target, mode", [("file", 0o664), ("file", 0o646), ("dir", 0o775), ("dir", 0o757)])
def test_unsafe_keys_file_permissions_admit_nobody(agent, client_key, workdir, target, mode):
    path = agent.keys_path if target == "file" else workdir
    original = path.stat().st_mode & 0o7777
    path.chmod(mode)
    try:
        assert_refused_login(agent.ssh(client_key, "get"))
        kind = "file" if target == "file" else "directory"
        agent.wait_for(rf'^WARNING keys-file-admits-nobody reason="keys {kind} {re.escape(str(path))} is writable by'
                       rf' group or others \(mode 0{mode:o}\)" fix="run chmod go-w {re.escape(str(path))}"$')
        agent.wait_for(r'refused .*request=publickey .*reason="keys .* is writable by group or others')
    finally:
        path.chmod(original)
    assert agent.ssh(client_key, "get").returncode == 0  # fixed without a restart


def test_malformed_lines_skipped_with_warnings_others_work(start_agent, client_key, workdir):
    keys_text = "\n".join([
        "# MITIGATOR instances",
        "this is not a key",
        "ssh-ed25519 not-base64!! broken",
        "ssh-ed25519",
        'from="127.0.0.1 ' + client_key.public_line,
        "",
        client_key.public_line,
    ]) + "\n"
    agent = start_agent(keys_text)
    assert agent.ssh(client_key, "get").returncode == 0
    warnings = agent.wait_for_all(rf"keys-file-warning problem=\"{re.escape(str(agent.keys_path))}:(\d+): ", 4)
    assert [int(match.group(1)) for match in warnings] == [2, 3, 4, 5]
    agent.wait_for(r"keys-file-loaded path=\S+ keys=1 skipped=4")


def test_key_added_while_running_admitted_removed_one_refused(agent, client_key, second_key):
    pid = agent.process.pid
    assert_refused_login(agent.ssh(second_key, "get"))
    added = subprocess.run([AGENT, "keys", "add", "--keys", str(agent.keys_path), second_key.public_line],
                           capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert added.returncode == 0, added.stderr
    assert agent.ssh(second_key, "get").returncode == 0
    assert agent.ssh(client_key, "get").returncode == 0
    removed = subprocess.run([AGENT, "keys", "remove", "--keys", str(agent.keys_path), "mitigator1"],
                             capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert removed.returncode == 0, removed.stderr
    assert_refused_login(agent.ssh(client_key, "get"))
    assert agent.ssh(second_key, "get").returncode == 0
    assert agent.process.pid == pid and agent.process.poll() is None
    assert agent.keys_path.stat().st_mode & 0o777 == 0o644
    agent.wait_for(r'poll .*instance=mitigator2 .*command=get status=0')


def test_from_option_honoured_per_address(start_agent, client_key):
    agent = start_agent(f'from="127.0.0.1" {client_key.public_line}\n')
    assert agent.ssh(client_key, "get", host="127.0.0.1").returncode == 0
    assert_refused_login(agent.ssh(client_key, "get", host="::1"))
    agent.wait_for(r'refused src=\[::1\]:\d+ .*reason="from= of line 1 does not admit ::1"')


def test_unsupported_option_refused_loudly(start_agent, client_key):
    agent = start_agent(f'command="get" {client_key.public_line}\n')
    assert_refused_login(agent.ssh(client_key, "get"))
    agent.wait_for(r"keys-file-warning problem=\"\S+:1: option 'command' is not supported by this agent")


def test_missing_then_empty_then_filled_keys_file(start_agent, client_key):
    agent = start_agent(None)
    assert_refused_login(agent.ssh(client_key, "get"))
    agent.wait_for(r'keys-file-admits-nobody reason="keys file \S+ does not exist"')
    agent.keys_path.write_text("")
    assert_refused_login(agent.ssh(client_key, "get"))
    agent.wait_for(r'keys-file-admits-nobody reason="keys file \S+ holds no usable key"')
    agent.keys_path.write_text(client_key.public_line + "\n")
    assert agent.ssh(client_key, "get").returncode == 0
